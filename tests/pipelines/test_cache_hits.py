"""kfp.local under `answering_hits`: a task whose output is committed is answered in this process, with the very
outputs its own process gives; only a task with work to do starts a process (no `from __future__ import
annotations` here: KFP reads the component's annotations as types)."""

import re
import shutil

from kfp import dsl, local

from blueprint.pipelines.cache_hits import answering_hits
from blueprint.store import storage

STARTED = "Looking for component"  # the first line of a task's own process (kfp's executor_main)


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def commit_text(artifact_root: str, text: str) -> str:
    from blueprint.store import artifacts

    def compute(out_dir):
        print(f"computing {text[-40:]}")
        (out_dir / "text.txt").write_text(text)
        return {"chars": len(text)}

    return artifacts.reuse_or_commit("demo", {"text": text}, {}, compute, artifact_root=artifact_root).uri


@dsl.pipeline
def chain(artifact_root: str) -> str:
    first = commit_text(artifact_root=artifact_root, text="first")
    return commit_text(artifact_root=artifact_root, text=first.output).output


def test_a_rerun_answers_every_hit_without_a_task_process_and_runs_only_what_is_missing(tmp_path, capfd):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    root = f"file://{tmp_path}/art"

    def run() -> tuple[str, str]:
        with answering_hits():
            output = chain(artifact_root=root).output
        return output, capfd.readouterr().out

    output, first = run()
    assert first.count(STARTED) == 2 and first.count("computing") == 2
    assert storage.read_text(storage.join(output, "text.txt")).startswith(f"{root}/demo/")  # the first's URI
    again_output, again = run()
    assert again_output == output
    assert STARTED not in again and "computing" not in again
    assert len(re.findall(r"Task .+ finished with status .*SUCCESS", again)) == 2
    shutil.rmtree(storage.local_path(output))  # the second output lost: only its task has work to do
    third_output, third = run()
    assert third_output == output and third.count(STARTED) == 1 and third.count("computing") == 1
