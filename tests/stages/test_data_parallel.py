"""Data-parallel stages on this CPU: 2 ranks under torchrun (gloo) against 1 process, on the smoke chain."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import SMOKE_PPO
from safetensors.torch import load_file

from blueprint import distributed
from blueprint.config import ConfigError, parse
from blueprint.pipelines import cli
from blueprint.runtime import launch
from blueprint.stages import evaluate, ppo_round
from blueprint.store import artifacts, storage

SMOKE_EVALUATE = {"max_examples": 16, "max_new_tokens": 16, "max_code_tokens": 128}


def _run(stage, module, settings, chain, out: Path, **inputs):
    cfg = parse(module, settings)
    return launch.run_stage(
        stage,
        cfg,
        {"shards": chain["shards"], "base": chain["base"], **inputs},
        artifact_root=None,
        out_uri=f"file://{out}",
        progress=False,
    )


def _max_diff(a: Path, b: Path, rel: str) -> float:
    left, right = load_file(a / rel), load_file(b / rel)
    assert left.keys() == right.keys()
    return max((left[k] - right[k]).abs().max().item() for k in left)


def test_ppo_round_on_two_ranks_trains_the_adapters_one_process_trains(smoke_chain, tmp_path):
    """Same global batch, same per-query sampling seeds: the summarizer LoRA, the value head and the coder after
    its supervised step agree to float rounding (the ranks' float sums run in another order), and so do the
    round's statistics."""
    settings = {**SMOKE_PPO, "rollout_seeds": "query", "batch_scope": "global"}
    outs = {
        n: _run(
            "ppo-round",
            ppo_round.PPORoundConfig,
            {**settings, "nproc": n},
            smoke_chain,
            tmp_path / f"n{n}",
            adapters=smoke_chain["adapters"],
        )
        for n in (1, 2)
    }
    assert not outs[2].cached
    for rel in (
        "adapters/summarizer/adapter_model.safetensors",
        "value_head.safetensors",
        "adapters/coder/adapter_model.safetensors",
    ):
        assert _max_diff(tmp_path / "n1", tmp_path / "n2", rel) < 1e-5, rel  # float rounding, grown by lr 1e-2
    one, two = outs[1].metrics, outs[2].metrics
    for key in ("kl_mean", "score_mean_mean", "entropy_mean", "kl_coef_last"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    assert one["kl_last"] > 0  # the policy moved, so agreeing is not agreeing on nothing


def test_evaluate_on_two_ranks_gives_the_same_bytes_as_one_process(smoke_chain, tmp_path, capsys):
    _run(
        "evaluate",
        evaluate.EvaluateConfig,
        SMOKE_EVALUATE,
        smoke_chain,
        tmp_path / "n1",
        adapters=smoke_chain["adapters"],
    )
    flags = [f"--set={k}={v}" for k, v in SMOKE_EVALUATE.items()]  # the command line, as a user runs it
    assert (
        cli.main(
            [
                "stage",
                "evaluate",
                *flags,
                "--set",
                "nproc=2",
                "--input",
                f"shards={smoke_chain['shards']}",
                "--input",
                f"base={smoke_chain['base']}",
                "--input",
                f"adapters={smoke_chain['adapters']}",
                "--out",
                f"file://{tmp_path / 'n2'}",
            ]
        )
        == 0
    )
    assert "starting 2 processes" in capsys.readouterr().out
    for name in ("metrics.json", "samples.jsonl"):
        assert (tmp_path / "n1" / name).read_bytes() == (tmp_path / "n2" / name).read_bytes(), name


def _rank_pid(marker: str, local_rank: str) -> int | None:
    """The pid of the worker rank `local_rank` whose command line holds `marker`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            "blueprint.runtime.worker" in cmdline
            and marker in cmdline
            and f"LOCAL_RANK={local_rank}".encode() in environ
        ):
            return int(pid)
    return None


def test_a_killed_rank_fails_the_round_in_one_line_and_the_rerun_resumes_to_the_same_adapters(smoke_chain, tmp_path):
    settings = {
        **SMOKE_PPO,
        "ppo_steps": 4,  # killed after its first checkpoint (step 2), with 2 steps to go
        "checkpoint_every": 2,
        "supervised_steps": 0,
        "nproc": 2,
        "batch_scope": "global",
    }
    out = tmp_path / "killed"
    failure: list[BaseException] = []

    def target():
        try:
            _run("ppo-round", ppo_round.PPORoundConfig, settings, smoke_chain, out, adapters=smoke_chain["adapters"])
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failure.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    checkpoint = artifacts.manifest_uri(storage.join(f"file://{out}", ppo_round.CHECKPOINT))
    deadline = time.time() + 120
    while not storage.exists(checkpoint) and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    pid = _rank_pid(str(out), "1")
    assert pid is not None, "rank 1 was not found running"
    os.kill(pid, signal.SIGKILL)
    thread.join(120)
    assert failure and isinstance(failure[0], launch.LaunchError), failure
    assert "\n" not in str(failure[0]) and "2 processes" in str(failure[0])
    assert not storage.exists(artifacts.manifest_uri(f"file://{out}"))  # nothing complete-looking was left

    resumed = _run("ppo-round", ppo_round.PPORoundConfig, settings, smoke_chain, out, adapters=smoke_chain["adapters"])
    assert resumed.metrics["resumed_at_step"] >= 2
    straight = _run(
        "ppo-round",
        ppo_round.PPORoundConfig,
        settings,
        smoke_chain,
        tmp_path / "straight",
        adapters=smoke_chain["adapters"],
    )
    for rel in ("adapters/summarizer/adapter_model.safetensors", "value_head.safetensors"):
        assert _max_diff(out, tmp_path / "straight", rel) == 0.0, rel
    assert json.loads((out / "steps.jsonl").read_text().splitlines()[-1]) == json.loads(
        (tmp_path / "straight" / "steps.jsonl").read_text().splitlines()[-1]
    )
    assert straight.metrics["resumed_at_step"] == 0


def test_a_setting_that_does_not_split_over_the_ranks_fails_in_one_line_naming_it(smoke_chain, tmp_path):
    settings = {**SMOKE_PPO, "nproc": 2, "coder_batch_size": 3, "batch_scope": "global"}
    with pytest.raises(ConfigError, match=r"coder_batch_size=3 does not split evenly over 2 processes"):
        _run(
            "ppo-round",
            ppo_round.PPORoundConfig,
            settings,
            smoke_chain,
            tmp_path / "out",
            adapters=smoke_chain["adapters"],
        )


def test_a_user_error_on_the_ranks_is_the_stages_one_line(smoke_chain, tmp_path):
    with pytest.raises(launch.LaunchError) as caught:  # a dataset given as the adapter set: every rank refuses it
        _run(
            "evaluate",
            evaluate.EvaluateConfig,
            {**SMOKE_EVALUATE, "nproc": 2},
            smoke_chain,
            tmp_path / "out",
            adapters=smoke_chain["shards"],
        )
    message = str(caught.value)
    assert "\n" not in message and smoke_chain["shards"] in message and "on 2 processes" in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_nproc_above_the_visible_gpus_is_refused_naming_the_setting(monkeypatch):
    monkeypatch.setattr(distributed, "visible_gpus", lambda: 2)
    assert distributed.resolve_nproc("auto") == 2
    assert distributed.resolve_nproc("2", "cuda") == 2
    with pytest.raises(ConfigError, match=r"nproc=4: only 2 GPU\(s\) visible"):
        distributed.resolve_nproc("4", "cuda")
    with pytest.raises(ConfigError, match=r"nproc=4: only 2 GPU\(s\) visible"):
        distributed.resolve_nproc("4")
    assert distributed.resolve_nproc("2", "cpu") == 2  # CPU processes (gloo) need no GPU


def test_one_process_needs_no_launch_and_reduces_nothing():
    cfg = parse(ppo_round.PPORoundConfig, {})
    assert launch.processes(cfg) == 1 and not launch.wants_launch(cfg)
    x = torch.tensor([1.0, 2.0])
    assert distributed.all_sum(x) is x and distributed.all_cat(x) is x
    assert list(distributed.my_share(4)) == [0, 1, 2, 3] and distributed.mine(["a", "b"]) == [(0, "a"), (1, "b")]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_the_default_profile_runs_on_1_2_4_and_8_ranks_each_with_its_own_batches(world):
    """nproc=auto on a node of 1-8 GPUs: no stage refuses the default profile, and each rank's PPO batches are
    the profile's (the step's totals grow with the ranks) instead of 1/world of them. Checked without launching."""
    from blueprint.distributed import ParallelSettings
    from blueprint.stages import profiles, registry

    for name, spec in registry.STAGES.items():
        cfg = parse(spec.config_type(), profiles.stage_settings("default", name))
        if isinstance(cfg, ParallelSettings):
            cfg.check_world(world)
    cfg = parse(ppo_round.PPORoundConfig, profiles.stage_settings("default", "ppo-round"))
    totals = cfg.totals(world)
    assert (totals.batch_size, totals.mini_batch_size, totals.coder_batch_size) == (
        cfg.batch_size * world,
        cfg.mini_batch_size * world,
        cfg.coder_batch_size * world,
    )
    assert ppo_round.queries_per_step(totals) // world == cfg.batch_size // cfg.samples_per_query
    glob = parse(ppo_round.PPORoundConfig, {**profiles.stage_settings("default", "ppo-round"), "batch_scope": "global"})
    assert glob.totals(world) == glob  # the settings are the step's totals, split over the ranks
