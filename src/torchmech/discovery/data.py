"""Reading trajectories for discovery from CSV and NPZ files, with clear messages for malformed input."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import torch

TIME_COLUMNS = ("t", "time")
ID_COLUMNS = ("trajectory", "traj", "id", "trajectory_id")


class DataError(ValueError):
    """The input data cannot be used; the message says what is wrong and where."""


@dataclass
class TrajectoryData:
    """Trajectories ready for discovery: ``ts[i]`` (T_i,) increasing, ``xs[i]`` (T_i, D)."""

    ts: list[torch.Tensor]
    xs: list[torch.Tensor]
    variables: list[str]
    source: str


def _check_trajectory(t: np.ndarray, x: np.ndarray, where: str, min_samples: int) -> None:
    if t.shape[0] < min_samples:
        raise DataError(f"{where}: {t.shape[0]} samples, but at least {min_samples} are needed "
                        f"(for the library and the derivative estimates)")
    if not np.all(np.isfinite(t)):
        raise DataError(f"{where}: the time column contains NaN or infinite values")
    bad = np.argwhere(~np.isfinite(x))
    if bad.size:
        raise DataError(f"{where}: {len(bad)} NaN or infinite value(s) in the variables, first at sample "
                        f"{bad[0][0]} (fill or drop missing values first)")
    dt = np.diff(t)
    restart = ("; if the file stacks several trajectories, give them an id column ('trajectory') or pass "
               "--id-column")
    if np.any(dt == 0):
        i = int(np.argmax(dt == 0))
        raise DataError(f"{where}: duplicated time {float(t[i]):g} at samples {i} and {i + 1}; times must be "
                        f"strictly increasing{restart}")
    if np.any(dt < 0):
        i = int(np.argmax(dt < 0))
        raise DataError(f"{where}: times are not increasing ({float(t[i]):g} then {float(t[i + 1]):g} at samples "
                        f"{i} and {i + 1}); sort the rows by time{restart}")


def _read_csv(path: str, time_column: str | None, id_column: str | None, min_samples: int):
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: drop a byte-order mark (Excel's CSV UTF-8)
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise DataError(f"{path}: expected a header row and data rows, found {len(rows)} row(s)")
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    if time_column is not None:
        if time_column not in header:
            raise DataError(f"{path}: no time column {time_column!r}; columns are {header}")
        ti = header.index(time_column)
    else:
        found = [i for i, h in enumerate(lower) if h in TIME_COLUMNS]
        if not found:
            raise DataError(f"{path}: no time column: name one of the columns 't' or 'time' (columns are "
                            f"{header}) or pass --time-column")
        if len(found) > 1:
            exact = [i for i in found if header[i] in TIME_COLUMNS]  # 't'/'time' as written beats 'T'/'Time'
            if len(exact) != 1:
                raise DataError(f"{path}: several columns could be the time column "
                                f"({', '.join(repr(header[i]) for i in found)}); pass --time-column")
            found = exact
        ti = found[0]
    ii = None
    guessed = False
    no_ids = id_column is not None and id_column.lower() == "none"  # every column but time is a variable
    if id_column is not None and not no_ids:
        if id_column not in header:
            raise DataError(f"{path}: no trajectory-id column {id_column!r}; columns are {header}")
        ii = header.index(id_column)
        if ii == ti:
            raise DataError(f"{path}: the time column and the trajectory-id column must differ, both are "
                            f"{id_column!r}")
    elif not no_ids:
        found = [i for i, h in enumerate(lower) if h in ID_COLUMNS]
        ii = found[0] if found else None
        guessed = ii is not None
    var_idx = [i for i in range(len(header)) if i not in (ti, ii)]
    if not var_idx:
        raise DataError(f"{path}: no variable columns besides time{'' if ii is None else ' and trajectory id'}")
    unnamed = [i + 1 for i in var_idx if not header[i]]
    if unnamed:
        raise DataError(f"{path}: column(s) {unnamed} of the header have no name (a trailing comma?); name every "
                        f"variable column")
    values = np.full((len(rows) - 1, len(header)), np.nan)
    for r, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}, line {r}: {len(row)} fields, expected {len(header)} (as in the header)")
        for c, cell in enumerate(row):
            cell = cell.strip()
            if cell == "" or cell.lower() in ("nan", "na"):
                continue  # reported as a NaN below, with its position
            try:
                values[r - 2, c] = float(cell)
            except ValueError:
                raise DataError(f"{path}, line {r}, column {header[c]!r}: {cell!r} is not a number") from None
    if ii is not None and np.isnan(values[:, ii]).any():
        r = int(np.argmax(np.isnan(values[:, ii])))
        raise DataError(f"{path}, line {r + 2}: the trajectory id ({header[ii]!r}) is missing")
    groups = [np.arange(values.shape[0])] if ii is None else \
        [np.flatnonzero(values[:, ii] == k) for k in dict.fromkeys(values[:, ii].tolist())]
    out = []
    for g in groups:
        where = path if ii is None else f"{path} (trajectory {values[g[0], ii]:g})"
        t, x = values[g, ti], values[g][:, var_idx]
        try:
            _check_trajectory(t, x, where, min_samples)
        except DataError as exc:
            if guessed:  # e.g. a drain current "Id" read as the trajectory id by its name
                raise DataError(f"{exc}; column {header[ii]!r} was taken as the trajectory id by its name: if it is "
                                "a variable, pass --id-column none") from None
            raise
        out.append((t, x))
    return out, [header[i] for i in var_idx]


def _read_npz(path: str, min_samples: int):
    import zipfile

    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an NPZ archive (save with numpy.savez; a single array saved with numpy.save "
                        "is a .npy file)")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # a corrupt archive: say so instead of a traceback
        raise DataError(f"{path}: cannot read as an NPZ archive ({exc})") from None
    missing = [k for k in ("t", "x") if k not in data.files]
    if missing:
        raise DataError(f"{path}: missing array(s) {missing}; an NPZ needs 't' (T,) and 'x' (T, D) or (B, T, D)")

    def numbers(key):
        try:
            a = data[key]
        except ValueError as exc:  # object arrays need pickle, which is not loaded from data files
            raise DataError(f"{path}: {key!r} is an object array ({exc}); store numbers") from None
        if a.dtype.kind not in "biuf":
            raise DataError(f"{path}: {key!r} must hold real numbers, got dtype {a.dtype}")
        return np.asarray(a, dtype=float)

    t, x = numbers("t"), numbers("x")
    if t.ndim != 1:
        raise DataError(f"{path}: 't' must have shape (T,), got {t.shape}")
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1] != t.shape[0]:
        raise DataError(f"{path}: 'x' must have shape (T, D) or (B, T, D) with T = {t.shape[0]}, got {data['x'].shape}")
    if x.shape[0] == 0 or x.shape[2] == 0:
        raise DataError(f"{path}: 'x' holds no {'trajectories' if x.shape[0] == 0 else 'variables'} "
                        f"(shape {data['x'].shape})")
    names = None
    if "names" in data.files:
        try:
            raw = data["names"]
        except ValueError:
            raise DataError(f"{path}: 'names' is an object array; store it as strings, e.g. "
                            "np.array(['x', 'y'])") from None
        if raw.ndim != 1 or raw.shape[0] != x.shape[2]:
            raise DataError(f"{path}: 'names' must list one name per variable, i.e. have shape ({x.shape[2]},) "
                            f"for 'x' of shape {data['x'].shape}; got shape {raw.shape}")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw.tolist()]
        if not all(n.strip() for n in names):
            raise DataError(f"{path}: 'names' contains an empty name: {names}")
    out = []
    for b in range(x.shape[0]):
        where = path if x.shape[0] == 1 else f"{path} (trajectory {b})"
        _check_trajectory(t, x[b], where, min_samples)
        out.append((t, x[b]))
    return out, names


def load_trajectories(paths: list[str], *, time_column: str | None = None, id_column: str | None = None,
                      min_samples: int = 10, dtype: torch.dtype = torch.float64,
                      device: str | torch.device = "cpu") -> TrajectoryData:
    """Read trajectories from CSV files (a time column, one column per variable, optionally a trajectory-id
    column) and/or NPZ files (``t`` (T,), ``x`` (T, D) or (B, T, D), optional ``names``).

    Raises:
        DataError: a file is missing or malformed (no time column, times not strictly increasing or
            duplicated, NaNs, too few samples, inconsistent variables across files).
    """
    trajs, variables = [], None
    for path in paths:
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file")
        ext = os.path.splitext(path)[1].lower()
        if ext == ".csv":
            got, names = _read_csv(path, time_column, id_column, min_samples)
        elif ext == ".npz":
            got, names = _read_npz(path, min_samples)
        else:
            raise DataError(f"{path}: unknown file type {ext!r}; expected .csv or .npz")
        D = got[0][1].shape[1]
        names = names or (["x", "y", "z"][:D] if D <= 3 else [f"x{i}" for i in range(D)])
        if variables is None:
            variables = names
        elif names != variables:
            raise DataError(f"{path}: variables {names} differ from {variables} in {paths[0]}")
        trajs.extend(got)
    as_t = lambda a: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
    return TrajectoryData([as_t(t) for t, _ in trajs], [as_t(x) for _, x in trajs], variables, ", ".join(paths))
