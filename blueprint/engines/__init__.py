"""Generation back ends behind one choice, the `engine` setting of every stage that generates.

`hf` is transformers' `generate()` on the stage's own model. `vllm` is a vLLM engine in the stage's own process
(colocated: it shares the device and is started once per stage), fed the merged weights of the adapter that
generates; in the PPO round it gets the summarizer's new weights after every update, and the trainer's log-probs of
the sampled tokens are compared with the engine's (`gap`) so that sampling from a stale policy stops the round.
Both give the same result types (token id lists), so nothing downstream knows which one ran.
"""
