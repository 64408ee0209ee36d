"""The original Python API: the usage snippet as written (model names replaced by a local tiny base folder)."""

from __future__ import annotations

import pytest
from conftest import SMOKE_PPO, SMOKE_SHARD, SMOKE_WARMUP, micro_qwen2_base, stdlib_texts
from transformers import AutoModelForCausalLM, AutoTokenizer

from blueprint import BluePrint
from blueprint.models.tiny import train_bpe_tokenizer
from blueprint.store import artifacts, storage

SMOKE = {
    "shard": {k: v for k, v in SMOKE_SHARD.items() if k != "source"},
    "warmup": SMOKE_WARMUP,
    "ppo-round": {k: v for k, v in SMOKE_PPO.items() if k not in ("ppo_steps", "supervised_steps")},
    "evaluate": {"max_examples": 8, "max_new_tokens": 16, "max_code_tokens": 128},
}


@pytest.fixture(scope="module")
def trained(smoke_chain, tmp_path_factory):
    base_dir = str(storage.local_path(smoke_chain["base"]))  # a local tiny base folder, as a user would pass
    root = tmp_path_factory.mktemp("api")
    bp = BluePrint(base_dir, base_dir, artifact_root=str(root / "artifacts"), settings=SMOKE, progress=False)
    history = bp.train(num_epochs=1, ppo_steps=2, supervised_steps=2)
    return bp, history, root


def test_seed_usage_trains_evaluates_each_epoch_and_saves_two_loadable_models(trained):
    bp, history, root = trained
    assert [h["epoch"] for h in history] == [0, 1]
    a, b = root / "code_to_summary", root / "summary_to_code"
    bp.save_models(str(a), str(b))
    for path in (a, b):
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        out = model.generate(
            **tok("### Summary:\nReturn x.\n### Code:\n", return_tensors="pt"), max_new_tokens=4, do_sample=False
        )
        assert out.shape[1] > 0


def test_save_models_refuses_a_path_holding_another_model_unless_overwrite(trained, tmp_path):
    bp, _, _ = trained
    target = tmp_path / "taken"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="taken"):
        bp.save_models(str(target), str(tmp_path / "b"))
    bp.save_models(str(target), str(tmp_path / "b"), overwrite=True)
    assert AutoModelForCausalLM.from_pretrained(target) is not None


def test_save_models_to_an_unwritable_target_fails_clearly(trained, unwritable_dir, tmp_path):
    bp, _, _ = trained
    with pytest.raises(storage.StorageError, match="locked"):
        bp.save_models(str(unwritable_dir / "a"), str(tmp_path / "b"))


def test_two_different_models_train_and_save_each_on_its_own_base(smoke_chain, tmp_path):
    """The original API's BluePrint(code_to_summary_model, summary_to_code_model) with two models and two tokenizers."""
    summarizer = str(storage.local_path(smoke_chain["base"]))
    coder = micro_qwen2_base(tmp_path / "coder", train_bpe_tokenizer(stdlib_texts(30)[::-1], vocab_size=384))
    bp = BluePrint(summarizer, coder, artifact_root=str(tmp_path / "artifacts"), settings=SMOKE, progress=False)
    assert [h["epoch"] for h in bp.train(num_epochs=1, ppo_steps=2, supervised_steps=2)] == [0, 1]
    bp.save_models(str(tmp_path / "a"), str(tmp_path / "b"))
    a, b = AutoModelForCausalLM.from_pretrained(tmp_path / "a"), AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert (a.config.model_type, b.config.model_type) == ("llama", "qwen2")
    assert (len(AutoTokenizer.from_pretrained(tmp_path / "a")), len(AutoTokenizer.from_pretrained(tmp_path / "b"))) == (
        512,
        384,
    )


def test_bad_settings_fail_at_construction_naming_them(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        BluePrint("tiny", artifact_root=str(tmp_path), settings={"warmup": {"steps": -1}})


def test_seed_snippet_runs_verbatim_in_a_folder_holding_a_model_named_base(smoke_chain, tmp_path, monkeypatch):
    """The original API's own lines, relative paths and all, next to a local model folder `base`."""
    import shutil

    shutil.copytree(storage.local_path(smoke_chain["base"]), tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    bp = BluePrint("base", "base", profile="smoke", progress=False)
    bp.train(num_epochs=3, ppo_steps=10, supervised_steps=10)
    bp.save_models("out/code_to_summary", "out/summary_to_code")
    assert [h["epoch"] for h in bp.history] == [0, 1, 2, 3]
    assert bp.artifact_root == storage.normalize(str(tmp_path / "artifacts"))
    for path in ("out/code_to_summary", "out/summary_to_code"):
        assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "llama"
        assert AutoTokenizer.from_pretrained(path).eos_token is not None


def test_a_stage_run_by_the_api_leaves_no_model_behind(smoke_chain, tmp_path):
    """Stages share one process under the API: a model kept alive by a reference cycle (accelerate's forward
    patch makes one) would be freed only by a full collection, and the next stage would hold a second copy. With
    the automatic collector off, only an explicit release at the end of the stage can free it."""
    import gc

    from transformers import PreTrainedModel

    def alive() -> set[int]:
        return {id(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel)}

    base_dir = str(storage.local_path(smoke_chain["base"]))
    bp = BluePrint(base_dir, base_dir, artifact_root=str(tmp_path / "artifacts"), settings=SMOKE, progress=False)
    before = alive()
    gc.disable()
    try:
        bp.prepare()  # shard, warmup (a model stage) and evaluate (another), in this process
        assert alive() - before == set()
    finally:
        gc.enable()


def test_the_api_runs_a_stage_on_the_processes_its_nproc_asks_for(smoke_chain, tmp_path, capsys):
    """The API goes through the same launcher as `blueprint stage` and the components: warmup with nproc=2
    starts two ranks under torchrun (gloo on this CPU) instead of silently running one process."""
    base_dir = str(storage.local_path(smoke_chain["base"]))
    settings = {**SMOKE, "warmup": {**SMOKE_WARMUP, "nproc": 2, "steps": 4}}  # the ranks, not the training
    bp = BluePrint(base_dir, base_dir, artifact_root=str(tmp_path / "artifacts"), settings=settings)
    bp.prepare()
    assert "warmup: starting 2 processes" in capsys.readouterr().out
    assert bp.adapters and bp.history[0]["examples"] > 0


def test_train_without_step_counts_takes_them_from_the_settings_as_blueprint_run_does(smoke_chain, tmp_path):
    base_dir = str(storage.local_path(smoke_chain["base"]))
    settings = {**SMOKE, "ppo-round": {**SMOKE["ppo-round"], "ppo_steps": 1, "supervised_steps": 1}}
    bp = BluePrint(base_dir, base_dir, artifact_root=str(tmp_path / "artifacts"), settings=settings, progress=False)
    bp.train(num_epochs=1)
    manifest = artifacts.read_manifest(bp.adapters)
    assert (manifest["config"]["ppo_steps"], manifest["config"]["supervised_steps"]) == (1, 1)
