"""Whether a stage's outputs are still what the current parameters make.

Three kinds of staleness, each answered here and nowhere else:

- **fingerprint**: a hash of the stage's "output" parameters (see
  `config.sections`), of the dataset's content for the data stage, and,
  recursively, of its upstream stages' fingerprints. Another fingerprint
  means other outputs: the stage is redone.
- **evaluation hash**: a hash of its "eval" parameters (and of those of the
  upstream stages whose metrics its evaluation reads, `reads_metrics`).
  Another hash means only a re-evaluation of the kept outputs.
- **upstream run ids**: every start from scratch gives a stage a new run id;
  a downstream stage records the ids it used, so an upstream stage redone
  with the same parameters (`--force`) still makes it stale.

`Staleness` reads manifests through the function it is given and never
writes; the run (`store.run.Run`) records what it computes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..config import Config, section_hash, section_values, with_neutral
from .files import read_json
from .lock import process_alive


class StaleUpstreamError(RuntimeError):
    """An upstream stage is missing, unfinished, or was made with other parameters."""


@dataclass(frozen=True)
class StageSpec:
    """What a stage is called, where it writes, and what it depends on.

    `sections`: top-level config sections (or fields) whose values it uses
    (minus the dotted fields in `ignore`);
    `content`: for the data stage, a function of the config describing the
    dataset's content (`data.content.dataset_content`), part of the fingerprint.
    """

    name: str
    folder: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    content: Callable[[Config], dict[str, Any]] | None = None
    explain_content: Callable[[dict, dict], list[str]] | None = None
    ignore: tuple[str, ...] = ()  # dotted fields of `sections` that do not change this stage's outputs
    reads_metrics: tuple[str, ...] = ()  # upstream stages whose evaluation this stage's evaluation uses
    version: int = 1  # raised when a fix changes the stage's outputs for the same parameters


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for every dotted key whose value differs between two plain mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            key = f"{prefix}.{k}" if prefix else k
            out += config_diff(old.get(k), new.get(k), key)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


class Staleness:
    """Fingerprints, evaluation hashes and the reasons a stage is not done."""

    def __init__(self, cfg: Config, specs: Mapping[str, StageSpec], manifest: Callable[[str], dict | None],
                 folder: Callable[[str], Path]):
        self.cfg = cfg
        self.specs = specs
        self.manifest = manifest
        self.folder = folder
        self._content: dict[str, dict[str, Any]] = {}

    def content(self, name: str) -> dict[str, Any] | None:
        """The current content description of a stage with a `content` hook (cached)."""
        spec = self.specs[name]
        if spec.content is None:
            return None
        if name not in self._content:
            self._content[name] = spec.content(self.cfg)
        return self._content[name]

    def fingerprint(self, name: str) -> str:
        """Hash of the stage's output parameters (and content), and, recursively,
        of its upstream stages'."""
        spec = self.specs[name]
        content = self.content(name)
        parts = [name, section_hash(self.cfg, spec.sections, ignore=spec.ignore), content["hash"] if content else ""]
        if spec.version != 1:  # version 1 adds nothing: fingerprints made before versions existed still hold
            parts.append(f"v{spec.version}")
        return _hash(*parts, *(self.fingerprint(u) for u in spec.upstream))

    def eval_sections(self, name: str) -> tuple[str, ...]:
        """A stage's own section (named like the stage) holds its evaluation
        parameters; sections it only borrows (the label filter uses the
        classifier's recipe) do not re-evaluate it."""
        return tuple(s for s in self.specs[name].sections if s == name)

    def eval_hash(self, name: str) -> str:
        """Hash of the stage's evaluation-only parameters (and of those of the
        upstream stages whose metrics its evaluation reads)."""
        own = section_hash(self.cfg, self.eval_sections(name), kind="eval")
        return _hash(own, *(self.eval_hash(u) for u in self.specs[name].reads_metrics))

    def upstream_runs(self, name: str) -> dict[str, str | None]:
        """The run id of each upstream stage's current outputs."""
        return {u: (self.manifest(u) or {}).get("run_id") for u in self.specs[name].upstream}

    def rerun_upstream(self, name: str) -> str | None:
        """An upstream stage redone (e.g. --force) since `name` used its outputs."""
        recorded = (self.manifest(name) or {}).get("upstream_runs", {})
        for u, rid in self.upstream_runs(name).items():
            if recorded.get(u) != rid:
                return u
        return None

    def outputs_stale(self, name: str) -> bool:
        """The stage has outputs, made with other output parameters or upstream outputs."""
        old = self.manifest(name)
        return old is not None and (old.get("fingerprint") != self.fingerprint(name)
                                    or self.rerun_upstream(name) is not None)

    def usable(self, name: str) -> bool:
        """Finished, and its outputs are those the current parameters and upstream make."""
        m = self.manifest(name)
        return bool(m) and m.get("status") == "done" and m.get("fingerprint") == self.fingerprint(name) \
            and self.rerun_upstream(name) is None

    def is_done(self, name: str) -> bool:
        """Usable and evaluated with the current evaluation parameters: nothing to do."""
        m = self.manifest(name)
        return self.usable(name) and m.get("eval_hash") == self.eval_hash(name)  # type: ignore[union-attr]

    def why_not_done(self, name: str) -> str | None:
        """A sentence saying why `name`'s outputs are not usable, or None."""
        m = self.manifest(name)
        spec = self.specs[name]
        folder = spec.folder
        if m is None:
            return f"{folder} has not been run"
        status = m.get("status")
        if status == "running" and not process_alive(m.get("pid", -1), m.get("host", "")):
            return f"{folder} was interrupted (process {m.get('pid')} stopped before it finished)"
        if status != "done":
            return f"{folder} did not finish (status: {status})"
        if m.get("fingerprint") == self.fingerprint(name):
            redone = self.rerun_upstream(name)
            return None if redone is None else \
                f"{folder} is stale because its input was redone since: {self.specs[redone].folder}"
        if m.get("version", 1) != spec.version:
            return (f"{folder} was made by version {m.get('version', 1)} of the stage's code, which gives other "
                    f"outputs than version {spec.version}")
        old, new = m.get("config", {}), section_values(self.cfg, spec.sections, ignore=spec.ignore)
        changes = config_diff(with_neutral(old, self.cfg, spec.sections), with_neutral(new, self.cfg, spec.sections))
        if changes:
            return f"{folder} was made with other parameters ({'; '.join(changes)})"
        content = self.content(name)
        if content is not None and m.get("content_hash") != content["hash"]:
            return f"{folder} was made from other data ({self._content_changes(name)})"
        for up in spec.upstream:
            if m.get("upstream", {}).get(up) != self.fingerprint(up):
                reason = self.why_not_done(up) or f"{self.specs[up].folder} was rerun since"
                return f"{folder} is stale because its input changed: {reason}"
        return f"{folder} is stale"

    def _content_changes(self, name: str) -> str:
        spec = self.specs[name]
        old_path = self.folder(name) / "content.json"
        if spec.explain_content is None or not old_path.is_file():
            return "the dataset changed"
        changes = spec.explain_content(read_json(old_path), self.content(name) or {})
        return "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "") \
            if changes else "the dataset changed"

    def ancestors(self, name: str) -> list[str]:
        """Every stage `name` depends on, directly or through others, in pipeline order."""
        seen: set[str] = set()
        todo = list(self.specs[name].upstream)
        while todo:
            u = todo.pop()
            if u not in seen:
                seen.add(u)
                todo.extend(self.specs[u].upstream)
        return [s for s in self.specs if s in seen]

    def check_upstream(self, name: str) -> None:
        """Raise StaleUpstreamError naming each unusable upstream stage and why; when
        those are usable, the first unusable stage further up (a stage redone with
        --force whose downstream was not: a stage reading files of both would mix them)."""
        direct = self.specs[name].upstream
        problems = [(u, r) for u in direct if (r := self.why_not_done(u))]
        if not problems:
            problems = next(([(u, r)] for u in self.ancestors(name) if u not in direct and (r := self.why_not_done(u))),
                            [])
        if problems:
            first = problems[0][0]
            raise StaleUpstreamError(
                f"stage {name!r} refuses to run on stale inputs: {'; '.join(r for _, r in problems)}. "
                f"Rerun from {first!r} first (wsss run --from {first})."
            )

    def manifest_fields(self, name: str) -> dict[str, Any]:
        """What a manifest records about the inputs its outputs were made from."""
        spec = self.specs[name]
        content = self.content(name)
        return {
            "fingerprint": self.fingerprint(name),
            **({"version": spec.version} if spec.version != 1 else {}),
            "eval_hash": self.eval_hash(name),
            "config": section_values(self.cfg, spec.sections, ignore=spec.ignore),
            "eval_config": section_values(self.cfg, self.eval_sections(name), kind="eval"),
            "content_hash": content["hash"] if content else None,
            "upstream": {u: self.fingerprint(u) for u in spec.upstream},
            "upstream_runs": self.upstream_runs(name),
        }
