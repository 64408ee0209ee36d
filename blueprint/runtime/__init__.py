"""What runs the stages: the task entry of a pipeline component (`task`), the launcher of a stage on several
processes (`launch`, `worker`) or nodes (`trainjob`), signals while it waits (`stopping`), the warm start, the
shard fan-out and the gate and promote task bodies. The stages never import it; it imports them."""
