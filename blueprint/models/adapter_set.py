"""The roles' models and adapters: each base (`bases.Bases`) opened once, the adapters saved and fetched as one set.

The summarizer, its KL reference and the value head live on `base`; the coder lives on `coder_base`, which is `base`
itself unless the user names another model (the original API's
`BluePrint(code_to_summary_model, summary_to_code_model)`).
Each distinct base is held in memory once: with one base, every role is an adapter of ONE PeftModel, as always;
with two, the summaries pass between them as text, so their tokenizers may differ.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from blueprint.models.bases import CODER, Bases, base_identity, is_artifact, open_base
from blueprint.store import artifacts

ADAPTERS_DIR = "adapters"
BASE_FILE = "base.json"
TOKENIZER_DIRS = {"summarizer": "tokenizer", CODER: "coder_tokenizer"}


def key_settings(config: Any, bases: Bases) -> dict[str, Any]:
    """The config as a dict plus the bases' settings contribution (for the cache key)."""
    return {**config.to_dict(), **bases.key_parts()[1]}


@dataclasses.dataclass
class RoleModels:
    """The summarizer's model (with its reference) and the coder's: the very same object when the bases are one."""

    summarizer: Any
    summarizer_tokenizer: Any
    coder: Any
    coder_tokenizer: Any

    @property
    def shared(self) -> bool:
        return self.summarizer is self.coder

    def model(self, adapter: str) -> Any:
        return self.coder if adapter == CODER else self.summarizer

    def tokenizer(self, adapter: str) -> Any:
        return self.coder_tokenizer if adapter == CODER else self.summarizer_tokenizer

    def wrapped(self, wrap: Callable[[Any, list[str]], Any], names: Sequence[str]) -> RoleModels:
        """Each distinct model replaced by `wrap(model, the adapter names that live on it)`."""
        if self.shared:
            model = wrap(self.summarizer, list(names))
            return RoleModels(model, self.summarizer_tokenizer, model, self.coder_tokenizer)
        policy_side, coder_side = [n for n in names if n != CODER], [n for n in names if n == CODER]
        policy = wrap(self.summarizer, policy_side) if policy_side else self.summarizer
        coder = wrap(self.coder, coder_side) if coder_side else self.coder
        return RoleModels(policy, self.summarizer_tokenizer, coder, self.coder_tokenizer)


def open_roles(bases: Bases, cfg: Any = None, progress: bool = True, task: str = "") -> RoleModels:
    """Both roles' bases placed by the stage's runtime settings; a base shared by both is opened once."""
    model, tokenizer = open_base(bases.summarizer, cfg, progress, task)
    if bases.shared:
        return RoleModels(model, tokenizer, model, tokenizer)
    coder, coder_tokenizer = open_base(bases.coder, cfg, progress, f"{task or 'base'}[coder]")
    return RoleModels(model, tokenizer, coder, coder_tokenizer)


def load_roles(
    roles: RoleModels, adapter_dir: Path, names: Sequence[str] | None = None, frozen: Sequence[str] = ("reference",)
) -> RoleModels:
    """The adapters saved under `adapter_dir` (`names`, default all of them) loaded onto the bases they belong to."""
    from blueprint.models import lora

    found = sorted(p.parent.name for p in Path(adapter_dir).glob("*/adapter_config.json"))
    names = (
        list(names)
        if names is not None
        else sorted(found, key=lambda n: (lora.ROLES.index(n) if n in lora.ROLES else len(lora.ROLES), n))
    )
    return roles.wrapped(lambda model, side: lora.load_adapters(model, adapter_dir, side, frozen), names)


def save_adapter_set(
    roles: RoleModels, out_dir: Path, bases: Bases, names: Sequence[str], extra: dict | None = None
) -> None:
    """Adapters (peft safetensors, each recording its own base), the tokenizer of each base, and the bases'
    identities, under `out_dir`."""
    from blueprint.models import lora

    named = {
        role: artifacts.portable_name(b) if is_artifact(b) else b  # no artifact root inside the files
        for role, b in (("summarizer", bases.summarizer), (CODER, bases.coder))
    }
    sides = [("summarizer", [n for n in names if n != CODER or roles.shared])]
    if not roles.shared and CODER in names:
        sides.append((CODER, [CODER]))
    for role, side in sides:
        lora.save_adapters(roles.model(role), out_dir / ADAPTERS_DIR, side, base_name=named[role])
        roles.tokenizer(role).save_pretrained(out_dir / TOKENIZER_DIRS[role])
    meta = {
        "base": named["summarizer"],
        "base_identity": base_identity(bases.summarizer),
        "adapters": list(names),
        **(extra or {}),
    }
    if not bases.shared:
        meta.update(coder_base=named[CODER], coder_base_identity=base_identity(bases.coder))
    (out_dir / BASE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def trained_on(meta: dict[str, Any]) -> tuple[str, str]:
    """(summarizer base identity, coder base identity) an adapter set's base.json records."""
    return meta["base_identity"], meta.get("coder_base_identity", meta["base_identity"])


def fetch_adapter_set(uri: str, bases: Bases, local_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Download a committed adapter set, refusing one whose roles were trained on other bases."""
    local, manifest = artifacts.download_artifact(uri, local_dir)
    if not (local / BASE_FILE).exists():
        raise artifacts.ArtifactError(
            f"adapters {uri} is a {manifest.get('stage')!r} output, not an adapter set (a warmup or ppo-round output)"
        )
    meta = json.loads((local / BASE_FILE).read_text())
    for role, recorded, base in zip(
        ("summarizer", CODER), trained_on(meta), (bases.summarizer, bases.coder), strict=True
    ):
        if recorded != base_identity(base):
            trained = meta["base"] if role == "summarizer" else meta.get("coder_base", meta["base"])
            setting = "base" if role == "summarizer" else "coder_base"
            raise artifacts.ArtifactError(
                f"adapters {uri}: the {role} was trained on base {trained!r} ({recorded}), not on {base!r} "
                f"({base_identity(base)}): pass the {setting} it was trained on"
            )
    return local / ADAPTERS_DIR, meta
