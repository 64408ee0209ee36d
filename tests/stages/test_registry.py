"""The registry is the one stage list: what the components, the pipeline's parameters, the cluster defaults, the
CLI and the profiles hold about a stage comes from it, and no other code spells a stage's name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from blueprint.stages import profiles, registry

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("blueprint", "components", "pipelines", "benchmarks")
STAGE_LIST = ("blueprint/stages/registry.py", "pipelines/blueprint_pipeline.py")  # the registry and the DAG
# the same word with another meaning
OTHER_MEANINGS = {
    ("blueprint/eval/promotion_rule.py", "promote"): "the gate's decision",
    ("blueprint/stages/ppo_round.py", "warmup"): "a value of the round's reference setting",
}


def stage_literals(source: str) -> list[tuple[int, str]]:
    """(line, name) of each string literal in `source` that is a stage or fan-out task name."""
    names = set(registry.task_names())
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
    ]


def test_the_literal_scan_finds_a_stage_name_and_a_task_name():
    assert stage_literals('run("ppo-round")\nx = {"shard-part": 1}\ny = "ppo round"') == [
        (1, "ppo-round"),
        (2, "shard-part"),
    ]


def test_no_code_outside_the_registry_and_the_dag_spells_a_stage_name():
    found = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in STAGE_LIST:
                found += [
                    f"{rel}:{line}: {name!r}"
                    for line, name in stage_literals(path.read_text())
                    if (rel, name) not in OTHER_MEANINGS
                ]
    assert not found, "use the registry's constants (registry.PPO_ROUND, ...):\n" + "\n".join(found)


def test_every_registry_stage_has_a_component_returning_its_outputs():
    from blueprint.components import build_components

    comps = build_components("example.com/blueprint:1")
    assert set(comps) == set(registry.task_names())
    for name, spec in registry.STAGES.items():
        outputs = comps[name].component_spec.outputs
        assert set(spec.outputs) <= set(outputs), name


def test_pipeline_parameters_are_the_registry_settings_with_their_descriptions(tmp_path):
    from blueprint.pipelines.blueprint_pipeline import compile_pipeline

    spec = yaml.safe_load(Path(compile_pipeline(str(tmp_path / "p.yaml"), epochs=1, profile="smoke")).read_text())
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name, stage in registry.STAGES.items():
        assert params[stage.param]["defaultValue"] == profiles.stage_settings("smoke", name), stage.param
        assert stage.summary in params[stage.param]["description"], stage.param
    assert all(p.get("description") for p in params.values()), [
        k for k, p in params.items() if not p.get("description")
    ]


def test_cluster_defaults_are_each_stages_registry_resources():
    from blueprint.pipelines import cluster

    settings = cluster.ClusterSettings()
    for name, spec in registry.STAGES.items():
        assert tuple(settings.resources_for(name).model_dump().values()) == tuple(spec.resources), name
    assert settings.gpu_stages == registry.accelerator_stages()


def test_gpu_help_names_every_accelerator_stage(capsys):
    from blueprint.pipelines.cli import main

    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    assert "/".join(registry.accelerator_stages()) in help_text and registry.GATE in registry.accelerator_stages()


def test_a_profile_sets_only_values_other_than_the_config_defaults():
    for name, spec in registry.STAGES.items():
        fields = spec.config_type().model_fields
        for profile in registry.PROFILE_NAMES:
            same = {k: v for k, v in spec.defaults(profile).items() if fields[k].default == v}
            assert not same, f"{profile} profile repeats {name}'s defaults {same}"


def test_stage_help_shows_what_the_profile_gives_beside_the_default(capsys):
    from blueprint.pipelines.cli import main

    with pytest.raises(SystemExit) as done:
        main(["stage", registry.PPO_ROUND, "--help", "--profile", "smoke"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "ppo_epochs (int, default 4; smoke profile: 1)" in out
    assert "lr (float, default 0.001)\n" in out  # a setting the profile leaves alone shows its default only


def test_merged_settings_put_overrides_over_the_profile_and_name_an_unknown_stage():
    merged = profiles.merged_settings("smoke", {registry.WARMUP: {"steps": 9}})
    assert merged[registry.WARMUP] == {**profiles.stage_settings("smoke", registry.WARMUP), "steps": 9}
    assert set(merged) == set(registry.STAGES)
    with pytest.raises(Exception, match="unknown stage.*warmpu"):
        profiles.merged_settings("smoke", {"warmpu": {}})


def test_stage_command_takes_the_optional_inputs_of_the_registry(tmp_path, capsys):
    from blueprint.pipelines.cli import main

    spec = registry.STAGES[registry.MERGE]
    flags = [f"--input={name}=file://{tmp_path}/x" for name in (*spec.inputs, *spec.optional_inputs, "bogus")]
    assert main(["stage", spec.name, *flags, "--artifact-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing none, unknown ['bogus']" in err
