"""Static user and item attributes from files, encoded into the static views' ``dense`` and ``cats`` arrays.

Two file formats per entity, told apart by their columns:

- KuaiRand-1K: ``user_features_1k.csv`` (``user_id, user_active_degree, is_lowactive_period, ...,
  onehot_feat0..17``) and ``video_features_basic_1k.csv`` (``video_id, author_id, video_type, upload_dt,
  upload_type, visible_status, video_duration, server_width, server_height, music_id, music_type, tag``);
- the simulator's own: ``user_id, activity`` and ``item_id, quality`` (:func:`simulator_frames`).

Counts become ``log1p``; strings from a known vocabulary become its index; other strings a stable CRC32
code; a missing categorical is ``MISSING_CODE`` and a missing number 0 (the same as an entity with no row).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from features.definitions import (
    ITEM_CATEGORICAL, ITEM_STATIC, MISSING_CODE, USER_CATEGORICAL, USER_STATIC,
)

KUAIRAND_USER_COLUMNS: tuple[str, ...] = (
    "user_id", "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
    "follow_user_num", "follow_user_num_range", "fans_user_num", "fans_user_num_range", "friend_user_num",
    "friend_user_num_range", "register_days", "register_days_range", *(f"onehot_feat{i}" for i in range(18)),
)
KUAIRAND_VIDEO_COLUMNS: tuple[str, ...] = (
    "video_id", "author_id", "video_type", "upload_dt", "upload_type", "visible_status", "video_duration",
    "server_width", "server_height", "music_id", "music_type", "tag",
)
SIMULATOR_USER_COLUMNS: tuple[str, ...] = ("user_id", "activity")
SIMULATOR_ITEM_COLUMNS: tuple[str, ...] = ("item_id", "quality")

VOCABULARIES: dict[str, tuple[str, ...]] = {
    "user_active_degree": ("high_active", "full_active", "middle_active", "UNKNOWN"),
    "follow_user_num_range": ("0", "(0,10]", "(10,50]", "(50,100]", "(100,150]", "(150,250]", "(250,500]", "500+"),
    "fans_user_num_range": ("0", "[1,10)", "[10,100)", "[100,1k)", "[1k,5k)", "[5k,1w)", "[1w,10w)"),
    "friend_user_num_range": ("0", "[1,5)", "[5,30)", "[30,60)", "[60,120)", "[120,250)", "250+"),
    "register_days_range": ("15-30", "31-60", "61-90", "91-180", "181-365", "366-730", "730+"),
    "video_type": ("NORMAL", "AD"),
}


class StaticSchemaError(ValueError):
    """A static feature file whose columns match neither KuaiRand-1K's nor the simulator's."""


def _codes(values: pd.Series, vocabulary: tuple[str, ...] | None = None) -> np.ndarray:
    """Integer codes: vocabulary index, else a stable CRC32 of the string, ``MISSING_CODE`` where absent."""
    text = values.astype("string")
    out = np.full(len(values), MISSING_CODE, dtype=np.int64)
    present = text.notna().to_numpy()
    if vocabulary is not None:
        index = pd.Index(vocabulary).get_indexer(text)
        known = present & (index >= 0)
        out[known] = index[known]
        present &= index < 0
    uniq, inverse = np.unique(text[present].to_numpy(dtype=str), return_inverse=True)
    hashed = np.fromiter((zlib.crc32(u.encode()) & 0x7FFFFFFF for u in uniq), np.int64, len(uniq))
    out[present] = hashed[inverse] + (len(vocabulary) if vocabulary else 0)
    return out


def _ints(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").fillna(MISSING_CODE).to_numpy(np.int64)


def _num(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame:
        return np.zeros(len(frame))
    return pd.to_numeric(frame[column], errors="coerce").fillna(0.0).to_numpy(np.float64)


def _check(frame: pd.DataFrame, path: str, formats: dict[str, tuple[str, ...]]) -> str:
    for name, columns in formats.items():
        if set(columns) <= set(frame.columns):
            return name
    wanted = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in formats.items())
    raise StaticSchemaError(f"{path}: columns {list(frame.columns)[:12]} match no known format ({wanted})")


def encode_users(frame: pd.DataFrame, source: str = "<frame>") -> pd.DataFrame:
    """``user_id, dense, cats`` rows (``USER_STATIC`` / ``USER_CATEGORICAL`` order) from either user format."""
    kind = _check(frame, source, {"kuairand": KUAIRAND_USER_COLUMNS, "simulator": SIMULATOR_USER_COLUMNS})
    dense = np.zeros((len(frame), len(USER_STATIC)), dtype=np.float32)
    cats = np.full((len(frame), len(USER_CATEGORICAL)), MISSING_CODE, dtype=np.int64)
    if kind == "kuairand":
        numeric = ["is_lowactive_period", "is_live_streamer", "is_video_author"]
        counts = ["follow_user_num", "fans_user_num", "friend_user_num", "register_days"]
        dense[:, :7] = np.column_stack([_num(frame, c) for c in numeric]
                                       + [np.log1p(np.clip(_num(frame, c), 0, None)) for c in counts])
        ranges = ["user_active_degree", "follow_user_num_range", "fans_user_num_range", "friend_user_num_range",
                  "register_days_range"]
        cats[:] = np.column_stack([_codes(frame[c], VOCABULARIES[c]) for c in ranges]
                                  + [_ints(frame[f"onehot_feat{i}"]) for i in range(18)])
    else:
        dense[:, USER_STATIC.index("u_sim_activity")] = _num(frame, "activity")
    return _rows("user_id", frame["user_id"], dense, cats)


def encode_items(frame: pd.DataFrame, source: str = "<frame>") -> pd.DataFrame:
    """``item_id, dense, cats`` rows (``ITEM_STATIC`` / ``ITEM_CATEGORICAL`` order) from either item format."""
    kind = _check(frame, source, {"kuairand": KUAIRAND_VIDEO_COLUMNS, "simulator": SIMULATOR_ITEM_COLUMNS})
    dense = np.zeros((len(frame), len(ITEM_STATIC)), dtype=np.float32)
    cats = np.full((len(frame), len(ITEM_CATEGORICAL)), MISSING_CODE, dtype=np.int64)
    if kind == "kuairand":
        width, height = _num(frame, "server_width"), _num(frame, "server_height")
        tags = frame["tag"].astype("string").fillna("")
        dense[:, :5] = np.column_stack([
            np.log1p(np.clip(_num(frame, "video_duration"), 0, None) / 1000),
            (frame["video_type"].astype("string") == "AD").fillna(False).to_numpy(np.float64),
            _num(frame, "visible_status"),
            np.divide(height, width, out=np.zeros(len(frame)), where=width > 0),
            tags.str.count(",").to_numpy(np.float64) + (tags != "").to_numpy(np.float64),
        ])
        cats[:] = np.column_stack([
            _ints(frame["author_id"]), _ints(frame["music_id"]), _ints(frame["music_type"]),
            _codes(frame["video_type"], VOCABULARIES["video_type"]), _codes(frame["upload_type"]),
            _ints(tags.str.split(",").str[0].replace("", pd.NA)),
        ])
        ids = frame["video_id"]
    else:
        dense[:, ITEM_STATIC.index("i_sim_quality")] = _num(frame, "quality")
        ids = frame["item_id"]
    return _rows("item_id", ids, dense, cats)


def _rows(key: str, ids: pd.Series, dense: np.ndarray, cats: np.ndarray) -> pd.DataFrame:
    numeric = pd.to_numeric(ids, errors="coerce")
    bad = numeric.isna() | (numeric != numeric.round())
    if bad.any():
        examples = ids[bad].head(3).tolist()
        raise ValueError(f"{key}: {int(bad.sum())} row(s) without an integer id, e.g. {examples}")
    repeated = numeric.duplicated(keep=False)
    if repeated.any():  # which one wins would depend on the store (Redis keeps the first, SQLite the last)
        raise ValueError(f"{key}: ids appear more than once, e.g. {sorted(set(numeric[repeated].astype(int)))[:3]}")
    return pd.DataFrame({key: numeric.to_numpy(np.int64), "dense": list(dense), "cats": list(cats)})


def read_static(path: Path, kind: str) -> pd.DataFrame:
    """Encoded rows of a static ``user`` or ``item`` file (CSV or Parquet)."""
    path = Path(path)
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, low_memory=False)
    return encode_users(frame, str(path)) if kind == "user" else encode_items(frame, str(path))


def simulator_frames(sim) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The simulator's own static files' contents: ``user_id, activity`` and ``item_id, quality``."""
    users = pd.DataFrame({"user_id": np.arange(len(sim.user_activity)), "activity": sim.user_activity})
    items = pd.DataFrame({"item_id": np.arange(len(sim.item_quality)), "quality": sim.item_quality})
    return users, items
