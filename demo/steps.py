"""A resumable sequence of steps: each records its settings' fingerprint and results under
`<out>/steps/<name>.json`; a rerun skips finished steps, and a step whose settings changed reruns
together with every step that builds on it (used by `make demo`). A step builds on the step
before it, or on the steps it names in `after` (so each model family's steps build on the shared
data steps, not on another family's)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cogvideo.configio import ConfigError


@dataclass
class Step:
    name: str
    run: Callable[
        [Any], dict | None
    ]  # called with the runner's context; returns what to record (figures, paths) or None
    uses: tuple[str, ...]  # config sections it depends on (besides every earlier step)
    outputs: tuple[str, ...]  # paths under out/ it owns: removed when its settings changed
    after: tuple[str, ...] | None = None  # the steps it builds on; None: the step before it


def fingerprint(previous: str, settings: dict) -> str:
    text = previous + json.dumps(settings, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def elapsed(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


class Runner:
    """Runs steps in order; `<out>/steps/<name>.json` records each one ({"fingerprint",
    "status": "running" | "done", "seconds", "result"})."""

    def __init__(self, out: Path, steps: list[Step], settings: dict, log: Callable[[str], None] = print):
        self.out, self.steps, self.log = out, steps, log
        self.fingerprints: dict[str, str] = {}
        self.builds_on: dict[str, tuple[str, ...]] = {}
        for index, step in enumerate(steps):
            before = step.after if step.after is not None else tuple(s.name for s in steps[index - 1 : index])
            unknown = [name for name in before if name not in self.fingerprints]
            if unknown:
                raise ValueError(f"step {step.name!r} builds on {unknown}, which are not earlier steps")
            self.builds_on[step.name] = before
            previous = "".join(self.fingerprints[name] for name in before)
            self.fingerprints[step.name] = fingerprint(previous, {key: settings[key] for key in step.uses})

    def marker(self, name: str) -> Path:
        return self.out / "steps" / f"{name}.json"

    def record(self, name: str) -> dict | None:
        path = self.marker(name)
        return json.loads(path.read_text()) if path.is_file() else None

    def _write(self, name: str, data: dict) -> None:
        path = self.marker(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
        os.replace(tmp, path)

    def clear(self, step: Step) -> None:
        for rel in step.outputs:
            path = self.out / rel
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        self.marker(step.name).unlink(missing_ok=True)

    def run(self, context, redo: str | None = None, until: str | None = None) -> dict:
        names = [s.name for s in self.steps]
        for name in (redo, until):
            if name is not None and name not in names:
                raise ConfigError(f"unknown step {name!r}; steps: {names}")
        start, rerun = time.perf_counter(), set()
        for index, step in enumerate(self.steps, 1):
            record, wanted = self.record(step.name), self.fingerprints[step.name]
            if (
                step.name == redo
                or rerun.intersection(self.builds_on[step.name])
                or (record is not None and record["fingerprint"] != wanted)
            ):
                self.clear(step)
                record = None
            banner = f"[{index}/{len(self.steps)}] {step.name}"
            if record is not None and record["status"] == "done":
                self.log(f"==== {banner}: done already ({record['seconds']:.0f} s), skipped")
                if step.name == until:
                    break
                continue
            rerun.add(step.name)  # what builds on it runs again too
            resumed = " (resuming)" if record is not None else ""
            self.log(f"==== {banner}{resumed} -- elapsed {elapsed(time.perf_counter() - start)} ====")
            self._write(step.name, {"fingerprint": wanted, "status": "running"})
            began = time.perf_counter()
            result = step.run(context) or {}
            seconds = time.perf_counter() - began
            self._write(
                step.name,
                {
                    "fingerprint": wanted,
                    "status": "done",
                    "seconds": round(seconds, 1),
                    "load_average": round(os.getloadavg()[1], 1),
                    "result": result,
                },
            )
            self.log(f"---- {banner} finished in {seconds:.0f} s")
            if step.name == until:
                break
        return self.summary()

    def summary(self) -> dict:
        """{"step_seconds": {name: s}, "results": {name: result}} of the steps done so far."""
        done = {s.name: self.record(s.name) for s in self.steps}
        done = {k: v for k, v in done.items() if v and v["status"] == "done"}
        return {
            "step_seconds": {k: v["seconds"] for k, v in done.items()},
            "load_average_5min": {k: v.get("load_average") for k, v in done.items()},
            "results": {k: v["result"] for k, v in done.items()},
        }
