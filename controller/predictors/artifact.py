"""The learned predictor's file: a skops archive plus a JSON header, never a pickle.

A skops file is a zip; we add ``kvctl_header.json`` to it (format version, feature
schema, model id, the trained features' ranges, held-out scores). Loading reads and
checks the header first (plain JSON), then the archive's types against an explicit
list (``TRUSTED_TYPES``: what a HistGradientBoostingRegressor needs beyond skops'
defaults) and refuses anything else — ``trusted=True`` is never used, so a file from
an untrusted path cannot run code. A wrong version, schema or model is a clear error.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from controller.predictors.features import SCHEMA, SCHEMA_VERSION

FORMAT = "kvctl-predictor"
FORMAT_VERSION = 2          # 2: one or more members; a version 1 file (one model) loads too
READS_VERSIONS = (1, 2)
HEADER_NAME = "kvctl_header.json"
KL_FLOOR = 1e-6             # the model fits log10(KL + KL_FLOOR)
RANGE_SLACK = 0.25          # features may leave the trained [lo, hi] by this x span
TRUSTED_TYPES = ["sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"]
_MEMBER_KEYS = ("feature_lo", "feature_hi", "strategies")


class ArtifactError(ValueError):
    """A predictor file this kvctl refuses (the message says why and what to do)."""


@dataclass
class Member:
    """One model and the feature ranges and strategies it was trained on."""
    model: object                     # sklearn HistGradientBoostingRegressor
    lo: np.ndarray                    # [F] trained feature minimum
    hi: np.ndarray                    # [F] trained feature maximum
    strategies: list[str]
    info: dict = field(default_factory=dict)   # rows, held-out scores

    def predict_kl(self, X: np.ndarray) -> np.ndarray:
        """X [n, F] in SCHEMA order -> predicted mean KL (nats), >= 0."""
        y = self.model.predict(np.asarray(X, dtype=np.float64))
        return np.maximum(0.0, 10.0 ** y - KL_FLOOR)

    def in_range(self, x: np.ndarray) -> bool:
        slack = RANGE_SLACK * np.maximum(self.hi - self.lo, 0.2)
        return bool(np.all((x >= self.lo - slack) & (x <= self.hi + slack)))

    def answers(self, strategy: str, x: np.ndarray) -> bool:
        return strategy in self.strategies and self.in_range(x)

    def header(self) -> dict:
        return {"feature_lo": self.lo.tolist(), "feature_hi": self.hi.tolist(),
                "strategies": self.strategies, **self.info}


@dataclass
class Artifact:
    """A predictor file: one or more members, each fitted on its own traces (e.g. the
    long sequences' and the short chat requests'). A move is priced by the first member
    trained on its strategy whose feature ranges hold it; none: the heuristic answers.
    Members apart keep each one's fit where its rows are: one model fitted on both moved
    the long sequences' plans (docs/BENCHMARKS.md, the fourteenth session)."""
    model_id: str                     # engine model name the traces came from
    members: list[Member]
    info: dict = field(default_factory=dict)   # versions

    def member_for(self, strategy: str, x: np.ndarray) -> int | None:
        """Index of the member that prices this move, None when none can."""
        return next((i for i, m in enumerate(self.members) if m.answers(strategy, x)), None)

    @property
    def strategies(self) -> list[str]:
        return sorted({s for m in self.members for s in m.strategies})

    def header(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "schema_version": SCHEMA_VERSION,
                "features": list(SCHEMA), "model_id": self.model_id,
                "target": f"log10(mean KL + {KL_FLOOR})",
                "members": [m.header() for m in self.members], **self.info}


def save(art: Artifact, path: str | Path) -> Path:
    import skops.io as sio

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    sio.dump([m.model for m in art.members], tmp, compression=zipfile.ZIP_DEFLATED, compresslevel=9)
    with zipfile.ZipFile(tmp, "a") as z:
        z.writestr(HEADER_NAME, json.dumps(art.header(), indent=1))
    tmp.replace(path)
    return path


def read_header(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"predictor file {path} does not exist")
    try:
        with zipfile.ZipFile(path) as z:
            if HEADER_NAME not in z.namelist():
                raise ArtifactError(f"{path} has no {HEADER_NAME}: not a kvctl predictor "
                                    "(make one with `kvctl train fit`)")
            header = json.loads(z.read(HEADER_NAME))
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not a kvctl predictor file ({e}); make one with "
                            "`kvctl train fit`") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a kvctl predictor file (format "
                            f"{header.get('format') if isinstance(header, dict) else None!r})")
    return header


def load(path: str | Path, model_id: str | None = None) -> Artifact:
    """Load and check a predictor file; ``model_id``: the model it must be for."""
    header = read_header(path)
    version = header.get("version")
    if version not in READS_VERSIONS:
        raise ArtifactError(f"{path} is predictor format version {version}; this kvctl "
                            f"reads versions {', '.join(map(str, READS_VERSIONS))}: retrain "
                            "with `kvctl train`")
    if header.get("schema_version") != SCHEMA_VERSION or header.get("features") != list(SCHEMA):
        raise ArtifactError(f"{path} was trained on feature schema "
                            f"v{header.get('schema_version')} {header.get('features')}; this "
                            f"kvctl computes schema v{SCHEMA_VERSION}: retrain with `kvctl train`")
    if model_id is not None and header.get("model_id") != model_id:
        raise ArtifactError(f"{path} was trained for model {header.get('model_id')!r}, not "
                            f"{model_id!r}")
    import skops.io as sio
    from sklearn.ensemble import HistGradientBoostingRegressor

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as e:   # a damaged archive: skops raises several kinds
        raise ArtifactError(f"{path}: cannot read the model archive ({e})") from None
    refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if refused:
        raise ArtifactError(f"{path} holds types kvctl does not trust: {refused}; refusing "
                            "to load it")
    obj = sio.load(path, trusted=[t for t in untrusted if t in TRUSTED_TYPES])
    models = obj if isinstance(obj, list) else [obj]
    for m in models:
        if not isinstance(m, HistGradientBoostingRegressor):
            raise ArtifactError(f"{path} holds a {type(m).__name__}, not a "
                                "HistGradientBoostingRegressor")
    heads = header.get("members") if version >= 2 else [header]
    if not isinstance(heads, list) or not heads or len(heads) != len(models) \
            or isinstance(obj, list) != (version >= 2):
        raise ArtifactError(f"{path}: its header describes {len(heads or [])} members, "
                            f"the archive holds {len(models)} models")
    members = []
    for m, h in zip(models, heads):
        try:
            lo, hi = np.asarray(h["feature_lo"], float), np.asarray(h["feature_hi"], float)
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{path}: a member without feature ranges") from None
        if lo.shape != (len(SCHEMA),) or hi.shape != lo.shape:
            raise ArtifactError(f"{path}: feature ranges do not match the schema")
        members.append(Member(m, lo, hi, list(h.get("strategies", [])),
                              {k: v for k, v in h.items() if k not in _MEMBER_KEYS}
                              if version >= 2 else
                              {k: h[k] for k in ("trained_on", "heldout") if k in h}))
    info = {k: v for k, v in header.items() if k not in {
        "format", "version", "schema_version", "features", "model_id", "target", "members",
        "trained_on", "heldout", *_MEMBER_KEYS}}
    return Artifact(header["model_id"], members, info)
