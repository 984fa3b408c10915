"""Safe loading (issue 6): YAML python tags are refused and never run, and a scan of the package
for unsafe loading calls (np.load / torch.load without their safe flags, pickle, unsafe YAML).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from medvlm3d import ConfigError, load_config

from malformed_cases import REPO
from malformed_cases import deadline  # noqa: F401  (autouse: the per-case time limit)

# ------------------------------------------------------------------------------- safe loading


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['mkdir {m}']",
    "!!python/object/apply:os.mkdir ['{m}']",
    "!!python/object/new:os.mkdir ['{m}']",
    "!!python/name:os.system",
    "!!python/module:os",
])  # fmt: skip
def test_yaml_python_tags_are_refused_and_never_run(tmp_path: Path, tag: str) -> None:
    marker = tmp_path / "RAN"
    value = tag.format(m=marker)
    (tmp_path / "evil.yaml").write_text(f"data:\n  train: {value}\n")
    (tmp_path / "child.yaml").write_text("base: evil.yaml\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml"):
        load_config(tmp_path / "evil.yaml")
    with pytest.raises(ConfigError, match=r"evil\.yaml"):
        load_config(tmp_path / "child.yaml")
    with pytest.raises((ConfigError, yaml.YAMLError)):  # key=value overrides are parsed with safe_load too
        load_config({}, [f"data.train={value}"])
    assert not marker.exists()


def _call(text: str, open_paren: int) -> str:
    depth = 0
    for i in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_paren : i + 1]
    return text[open_paren:]


def test_no_unsafe_loading_calls_in_the_package() -> None:
    """np.load only with allow_pickle=False, torch.load only with weights_only=True, YAML only
    through safe_load, no pickle/joblib/dill loads, trust_remote_code never hard-wired on."""
    need = {r"\bnp\.load\(": "allow_pickle=False", r"\bnumpy\.load\(": "allow_pickle=False",
            r"\btorch\.load\(": "weights_only=True"}
    never = [r"\bpickle\.loads?\(", r"\bjoblib\.load\(", r"\bdill\.loads?\(", r"\byaml\.(load|full_load|unsafe_load)\(",
             r"yaml\.(Unsafe|Full)?Loader\b", r"trust_remote_code\s*=\s*True", r"weights_only\s*=\s*False",
             r"allow_pickle\s*=\s*True"]
    bad, files = [], 0
    for folder in ("data", "model", "train", "eval", "medvlm3d"):
        for f in sorted((REPO / folder).rglob("*.py")):
            files += 1
            text = f.read_text(encoding="utf-8")
            for pattern, kw in need.items():
                for m in re.finditer(pattern, text):
                    if kw not in _call(text, m.end() - 1).replace(" ", ""):
                        bad.append(f"{f.relative_to(REPO)}: {m.group(0)} without {kw}")
            bad += [f"{f.relative_to(REPO)}: {m.group(0)}" for p in never for m in re.finditer(p, text)]
    assert files > 20 and not bad, bad
