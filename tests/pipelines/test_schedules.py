"""Schedules by name against the KFP REST contract: `schedule` replaces the recurring run of its name (create the
new one, then delete the old), `schedules` lists them, `unschedule` deletes them, and every half-way failure says
what is scheduled now."""

import shlex

import pytest

from blueprint.pipelines import cli, schedules
from tests.pipelines import kfp_fake

kfp_server = kfp_fake.kfp_server  # the fake KFP REST server, as this module's fixture

IMAGE = "registry.example.com/ml/blueprint:1.2.3"
RECURRING = "/apis/v2beta1/recurringruns"


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> str:
    """A small compiled KFP package (a parameter, a secret in its platform spec): what these tests schedule is
    how recurring runs are replaced, not the BluePrint DAG, which test_kubeflow.py sends whole."""
    from kfp import compiler, dsl, kubernetes

    @dsl.component(base_image=IMAGE)
    def train(ppo_steps: int) -> int:
        return ppo_steps

    @dsl.pipeline(name="blueprint")
    def retrain(ppo_steps: int = 16, artifact_root: str = "file:///tmp/art"):
        kubernetes.use_secret_as_env(
            train(ppo_steps=ppo_steps),
            secret_name="s3-creds",
            secret_key_to_env={"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID"},
        )

    path = tmp_path_factory.mktemp("package") / "pipeline.yaml"
    compiler.Compiler().compile(retrain, str(path))
    return str(path)


def _schedule(server, package: str, *flags: str) -> int:
    return cli.main(["schedule", "--host", server.url, "--package", package, *flags])


def _runs(server) -> list[dict]:
    return list(server.recurring_runs.values())


def _cron(run: dict) -> str:
    return run["trigger"]["cron_schedule"]["cron"]


def test_scheduling_the_same_name_twice_leaves_one_recurring_run_the_new_one(kfp_server, package, capsys):
    server = kfp_server()
    assert _schedule(server, package, "--name", "weekly", "--cron", "0 3 * * 1", "--param", "ppo_steps=5") == 0
    assert _schedule(server, package, "--name", "other", "--cron", "@daily") == 0
    assert _schedule(server, package, "--name", "weekly", "--cron", "0 4 * * 2", "--param", "ppo_steps=7") == 0
    out = capsys.readouterr().out
    assert "scheduled recurring run rr-3 ('weekly', enabled)" in out and "replaced rr-1 ('weekly')" in out
    weekly = [r for r in _runs(server) if r["display_name"] == "weekly"]
    assert [r["recurring_run_id"] for r in weekly] == ["rr-3"]
    assert _cron(weekly[0]) == "0 0 4 * * 2" and weekly[0]["runtime_config"]["parameters"] == {"ppo_steps": 7}
    assert "rr-2" in server.recurring_runs  # another name is left alone
    methods = [(r["method"], r["path"]) for r in server.requests]
    assert methods.index(("POST", RECURRING), methods.index(("POST", RECURRING)) + 1) < methods.index(
        ("DELETE", f"{RECURRING}/rr-1")
    )  # the new one is created before the old is deleted
    listed = server.find("GET", RECURRING)[-1]["query"]
    assert "weekly" in listed["filter"][0] and listed["experiment_id"] == ["exp-1"]


def test_the_same_name_in_another_experiment_is_not_replaced(kfp_server, package):
    server = kfp_server()
    assert _schedule(server, package, "--name", "weekly", "--cron", "@daily", "--experiment", "a") == 0
    assert _schedule(server, package, "--name", "weekly", "--cron", "@weekly", "--experiment", "b") == 0
    assert sorted(r["recurring_run_id"] for r in _runs(server)) == ["rr-1", "rr-2"]
    assert not server.find("DELETE", f"{RECURRING}/rr-1")


def test_a_replace_whose_create_fails_leaves_the_old_schedule_and_says_nothing_was_changed(kfp_server, package, capsys):
    server = kfp_server()
    assert _schedule(server, package, "--name", "weekly", "--cron", "0 3 * * 1") == 0
    capsys.readouterr()
    server.fail[f"POST {RECURRING}"] = 500
    assert _schedule(server, package, "--name", "weekly", "--cron", "0 4 * * 2") == 2
    captured = capsys.readouterr()
    assert "scheduled" not in captured.out and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith(
        "blueprint schedule: error: creating the new recurring run failed, so nothing "
        "was changed: recurring run rr-1 ('weekly') is still scheduled as before"
    )
    assert "answered 500" in captured.err and "Traceback" not in captured.err
    assert [(r["recurring_run_id"], _cron(r)) for r in _runs(server)] == [("rr-1", "0 0 3 * * 1")]
    assert not [r for r in server.requests if r["method"] == "DELETE"]
    assert _schedule(server, package, "--name", "weekly", "--cron", "@daily", "--pipeline", "blueprint") == 2
    assert "still scheduled as before (pipeline version pv-1, uploaded for it, stays unused)" in capsys.readouterr().err
    assert list(server.recurring_runs) == ["rr-1"]


def test_a_delete_that_fails_after_the_create_names_both_ids_and_the_command_that_removes_the_stale_one(
    kfp_server, package, capsys
):
    server = kfp_server()
    assert _schedule(server, package, "--name", "weekly", "--cron", "0 3 * * 1") == 0
    server.fail[f"DELETE {RECURRING}/rr-1"] = 503
    assert _schedule(server, package, "--name", "weekly", "--cron", "0 4 * * 2") != 0
    captured = capsys.readouterr()
    assert "scheduled recurring run rr-2 ('weekly', enabled)" in captured.out
    (line,) = captured.err.strip().splitlines()
    command = f"blueprint unschedule --id rr-1 --host {server.url}"
    assert "recurring run rr-2 replaces rr-1 ('weekly'), but deleting rr-1 failed, so both are scheduled" in line
    assert f"`{command}`" in line and "answered 503" in line
    assert sorted(server.recurring_runs) == ["rr-1", "rr-2"]
    del server.fail[f"DELETE {RECURRING}/rr-1"]
    assert cli.main(shlex.split(command)[1:]) == 0  # the printed command, as printed, removes the stale one
    assert sorted(server.recurring_runs) == ["rr-2"]


def test_concurrent_schedules_of_one_name_converge_to_one_recurring_run_and_print_what_remains(
    kfp_server, package, capsys
):
    import threading

    server = kfp_server()
    assert _schedule(server, package, "--name", "weekly", "--cron", "@daily") == 0
    server.gates[f"POST {RECURRING}"] = threading.Barrier(2)  # both listed rr-1 alone; now both create at once
    codes = []
    callers = [
        threading.Thread(
            target=lambda cron=cron: codes.append(_schedule(server, package, "--name", "weekly", "--cron", cron))
        )
        for cron in ("0 3 * * 1", "0 4 * * 2")
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(60)
    assert codes == [0, 0]
    weekly = [r["recurring_run_id"] for r in _runs(server) if r["display_name"] == "weekly"]
    assert len(weekly) == 1 and weekly[0] in ("rr-2", "rr-3")  # the newer of the two, whichever that was
    out = capsys.readouterr().out
    assert f"recurring runs named 'weekly' now: {weekly[0]}\n" in out  # the caller that finished last says so
    assert "unschedule" not in out


def test_schedules_lists_name_id_cron_state_and_pipeline_version(kfp_server, package, capsys):
    server = kfp_server()
    assert _schedule(server, package, "--name", "weekly", "--cron", "0 3 * * 1") == 0
    assert (
        _schedule(
            server, package, "--name", "nightly", "--cron", "@daily", "--paused", "--pipeline", "blueprint-retrain"
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["schedules", "--host", server.url]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["name", "id", "schedule", "(UTC)", "state", "pipeline", "version", "experiment"]
    assert [row.split() for row in rows] == [
        ["weekly", "rr-1", "cron", "0", "0", "3", "*", "*", "1", "enabled", "inline", "exp-1"],
        ["nightly", "rr-2", "cron", "@daily", "paused", "pv-1", "exp-1"],
    ]


def test_schedules_of_one_experiment_and_of_an_unknown_one(kfp_server, package, capsys):
    server = kfp_server()
    assert _schedule(server, package, "--name", "weekly", "--cron", "@weekly", "--experiment", "a") == 0
    assert _schedule(server, package, "--name", "daily", "--cron", "@daily", "--experiment", "b") == 0
    capsys.readouterr()
    posted = len([r for r in server.requests if r["method"] == "POST"])
    assert cli.main(["schedules", "--host", server.url, "--experiment", "b"]) == 0
    out = capsys.readouterr().out
    assert "daily" in out and "weekly" not in out
    assert cli.main(["schedules", "--host", server.url, "--experiment", "nope"]) == 2
    err = capsys.readouterr().err
    assert err == f"blueprint schedules: error: no experiment 'nope' on {server.url}, so no recurring run in it\n"
    assert len([r for r in server.requests if r["method"] == "POST"]) == posted  # listing never creates one


def test_schedules_reads_every_page(kfp_server, package, capsys, monkeypatch):
    server = kfp_server()
    for name in ("a", "b", "c", "d", "e"):
        assert _schedule(server, package, "--name", name, "--cron", "@daily") == 0
    capsys.readouterr()
    monkeypatch.setattr(schedules, "PAGE_SIZE", 2)
    assert cli.main(["schedules", "--host", server.url]) == 0
    assert [row.split()[0] for row in capsys.readouterr().out.splitlines()[1:]] == ["a", "b", "c", "d", "e"]
    tokens = [r["query"].get("page_token", [""])[0] for r in server.find("GET", RECURRING)[-3:]]
    assert tokens == ["", "2", "4"]


def test_unschedule_deletes_every_recurring_run_of_the_name(kfp_server, package, capsys):
    server = kfp_server()
    assert _schedule(server, package, "--name", "weekly", "--cron", "@weekly") == 0
    assert _schedule(server, package, "--name", "other", "--cron", "@daily") == 0
    duplicate = server.new_id("rr")  # two of one name, as repeated schedules made them before replacing existed
    server.recurring_runs[duplicate] = {**server.recurring_runs["rr-1"], "recurring_run_id": duplicate}
    capsys.readouterr()
    assert cli.main(["unschedule", "--host", server.url, "--name", "weekly"]) == 0
    out = capsys.readouterr().out
    assert "deleted recurring run rr-1 ('weekly')" in out and f"deleted recurring run {duplicate} ('weekly')" in out
    assert sorted(server.recurring_runs) == ["rr-2"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--name", "weekly"], "no recurring run named 'weekly' in experiment 'blueprint' on {url}"),
        (["--name", "daily", "--experiment", "nope"], "no experiment 'nope' on {url}"),
        (["--id", "rr-404"], "no recurring run with id 'rr-404' on {url}"),
    ],
)
def test_unschedule_of_an_unknown_name_is_one_line_and_exit_2(flags, message, kfp_server, package, capsys):
    server = kfp_server()
    assert _schedule(server, package, "--name", "daily", "--cron", "@daily") == 0
    capsys.readouterr()
    assert cli.main(["unschedule", "--host", server.url, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"blueprint unschedule: error: {message.format(url=server.url)}")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(server.recurring_runs) == ["rr-1"]


def test_schedule_with_pipeline_uploads_a_version_and_pins_it(kfp_server, package, capsys):
    server = kfp_server()
    assert _schedule(server, package, "--name", "weekly", "--cron", "@weekly", "--pipeline", "blueprint-retrain") == 0
    (upload,) = server.find("POST", "/apis/v2beta1/pipelines/upload")
    assert upload["query"]["name"] == ["blueprint-retrain"]
    assert upload["body"]["files"]["uploadfile"][1] == open(package, "rb").read()
    (first,) = _runs(server)
    assert first["pipeline_version_reference"] == {"pipeline_id": "pl-1", "pipeline_version_id": "pv-1"}
    assert "pipeline_spec" not in first  # pinned, not inline
    assert _schedule(server, package, "--name", "weekly", "--cron", "@daily", "--pipeline", "blueprint-retrain") == 0
    (version,) = server.find("POST", "/apis/v2beta1/pipelines/upload_version")
    assert version["query"]["pipelineid"] == ["pl-1"] and version["query"]["name"][0].startswith("weekly ")
    assert list(server.pipelines) == ["pl-1"] and sorted(server.versions) == ["pv-1", "pv-2"]
    (second,) = _runs(server)
    assert second["pipeline_version_reference"] == {"pipeline_id": "pl-1", "pipeline_version_id": "pv-2"}
    assert _cron(second) == "@daily"
    assert "runs pipeline version pv-2 (pipeline pl-1); replaced rr-1" in capsys.readouterr().out


def test_schedule_pins_a_given_pipeline_version_and_checks_parameters_against_it(kfp_server, package, capsys):
    server = kfp_server()
    assert _schedule(server, package, "--name", "weekly", "--cron", "@weekly", "--pipeline", "blueprint-retrain") == 0
    pinned = ["--host", server.url, "--name", "weekly", "--cron", "@daily"]
    pinned += ["--pipeline-id", "pl-1", "--pipeline-version-id", "pv-1"]
    assert cli.main(["schedule", *pinned, "--param", "ppo_steps=3"]) == 0
    (run,) = _runs(server)
    assert run["pipeline_version_reference"] == {"pipeline_id": "pl-1", "pipeline_version_id": "pv-1"}
    assert run["runtime_config"]["parameters"] == {"ppo_steps": 3} and run["recurring_run_id"] == "rr-2"
    capsys.readouterr()
    assert cli.main(["schedule", *pinned, "--param", "ppo_steps=many"]) == 2
    assert "--param ppo_steps: 'many' is not a number_integer" in capsys.readouterr().err
    assert [r["recurring_run_id"] for r in _runs(server)] == ["rr-2"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--pipeline-id", "pl-1"], "--pipeline-id and --pipeline-version-id go together"),
        (["--pipeline-id", "pl-1", "--pipeline-version-id", "pv-1", "--gpu"], "--gpu would be ignored"),
        (["--pipeline-id", "pl-1", "--pipeline-version-id", "pv-1", "--pipeline", "p"], "--pipeline would be ignored"),
    ],
)
def test_inconsistent_pipeline_flags_fail_before_any_request(flags, message, kfp_server, capsys):
    server = kfp_server()
    assert cli.main(["schedule", "--host", server.url, "--cron", "@daily", *flags]) == 2
    assert message in capsys.readouterr().err and server.requests == []
