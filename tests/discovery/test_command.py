"""`torchmech discover`: the default run, CSV/NPZ input, and a clear message for every malformed input."""

import json

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from torchmech.cli import main


def lorenz_arrays(n=600, t1=6.0, y0=(-8, 8, 27)):
    def f(_t, s):
        x, y, z = s
        return [10 * (y - x), x * (28 - z) - y, x * y - 8 / 3 * z]

    t = np.linspace(0, t1, n)
    return t, solve_ivp(f, (0, t1), y0, t_eval=t, rtol=1e-10, atol=1e-10).y.T


def write_csv(path, header, rows):
    with open(path, "w") as fh:
        fh.write(",".join(header) + "\n")
        for r in rows:
            fh.write(",".join(str(v) for v in r) + "\n")
    return str(path)


def test_default_run_quick(tmp_path, capsys):
    """What `make demo` runs (both methods on noisy Lorenz), with the reduced budget."""
    assert main(["discover", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "true equations" in out and out.count("exact recovery") == 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["methods"]) == {"sindy", "mnn"}
    for entry in report["methods"].values():
        assert entry["metrics"]["exact"] is True
        assert entry["metrics"]["median_rel_error"] < 0.02
        assert entry["trajectory_r2"] > 0.9
    assert (tmp_path / "discover.png").stat().st_size > 1000


def test_csv_with_two_trajectories(tmp_path, capsys):
    rows = []
    for k, y0 in enumerate([(-8, 8, 27), (1, 1, 1)]):
        t, x = lorenz_arrays(y0=y0)
        rows += [(k, ti, *xi) for ti, xi in zip(t, x)]
    path = write_csv(tmp_path / "lorenz.csv", ["trajectory", "time", "u", "v", "w"], rows)
    code = main(["discover", path, "--method", "mnn", "--quick", "--no-progress", "--out", str(tmp_path / "o")])
    assert code == 0
    out = capsys.readouterr().out
    assert "u' = " in out and "w' = " in out and "held out" in out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["variables"] == ["u", "v", "w"]


def test_npz_input(tmp_path, capsys):
    t, x = lorenz_arrays()
    path = tmp_path / "d.npz"
    np.savez(path, t=t, x=x)
    assert main(["discover", str(path), "--method", "mnn", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    assert "x' = " in capsys.readouterr().out


def _bad(tmp_path, capsys, args, match):
    code = main(["discover", *args, "--method", "mnn", "--quick", "--no-progress", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert match in err, err


def test_missing_time_column(tmp_path, capsys):
    p = write_csv(tmp_path / "a.csv", ["a", "b"], [(i, i) for i in range(50)])
    _bad(tmp_path, capsys, [p], "no time column")


def test_non_monotonic_times(tmp_path, capsys):
    rows = [(i if i != 20 else 5, i) for i in range(50)]
    _bad(tmp_path, capsys, [write_csv(tmp_path / "a.csv", ["t", "x"], rows)], "not increasing")


def test_duplicated_times(tmp_path, capsys):
    rows = [(i if i != 21 else 20, i) for i in range(50)]
    _bad(tmp_path, capsys, [write_csv(tmp_path / "a.csv", ["t", "x"], rows)], "duplicated time")


def test_nan_values(tmp_path, capsys):
    rows = [(i, "nan" if i == 7 else i) for i in range(50)]
    _bad(tmp_path, capsys, [write_csv(tmp_path / "a.csv", ["t", "x"], rows)], "NaN or infinite value(s)")


def test_too_few_samples(tmp_path, capsys):
    _bad(tmp_path, capsys, [write_csv(tmp_path / "a.csv", ["t", "x"], [(i, i) for i in range(8)])],
         "at least 32 are needed")


def test_not_a_number_and_ragged_rows(tmp_path, capsys):
    rows = [(i, "abc" if i == 3 else i) for i in range(50)]
    _bad(tmp_path, capsys, [write_csv(tmp_path / "a.csv", ["t", "x"], rows)], "'abc' is not a number")
    p = tmp_path / "b.csv"
    p.write_text("t,x\n0,1\n1,2,3\n")
    _bad(tmp_path, capsys, [str(p)], "3 fields, expected 2")


def test_missing_file_unknown_type_and_bad_npz(tmp_path, capsys):
    _bad(tmp_path, capsys, [str(tmp_path / "nope.csv")], "no such file")
    p = tmp_path / "d.txt"
    p.write_text("1")
    _bad(tmp_path, capsys, [str(p)], "unknown file type")
    q = tmp_path / "d.npz"
    np.savez(q, time=np.arange(40.0))
    _bad(tmp_path, capsys, [str(q)], "missing array(s) ['t', 'x']")


def test_unknown_system_and_bad_noise(tmp_path, capsys):
    _bad(tmp_path, capsys, ["--system", "lorenzz"], "unknown system")
    _bad(tmp_path, capsys, ["--noise", "-1"], "--noise must be")


def test_shortest_accepted_series_with_sindy(tmp_path, capsys):
    """32 samples (the least the command accepts): the weak-form window must shrink to an odd width."""
    t, x = lorenz_arrays(n=32, t1=1.0)
    path = write_csv(tmp_path / "short.csv", ["t", "x", "y", "z"], [(ti, *xi) for ti, xi in zip(t, x)])
    code = main(["discover", path, "--method", "sindy", "--no-progress", "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    assert "x' = " in capsys.readouterr().out


def test_threshold_chosen_by_cross_validation(tmp_path, capsys):
    code = main(["discover", "--method", "sindy", "--threshold", "cv", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "terms chosen by cross-validation" in out and "exact recovery" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["methods"]["sindy"]["threshold"] == "cv" and report["methods"]["sindy"]["metrics"]["exact"]
    for bad in ("abc", "-1", "inf"):
        with pytest.raises(SystemExit) as exc:
            main(["discover", "--threshold", bad, "--out", str(tmp_path)])
        assert exc.value.code == 2
        assert "--threshold: expected a number >= 0 or 'cv'" in capsys.readouterr().err


def test_npz_names_must_match_the_variables(tmp_path, capsys):
    t, x = lorenz_arrays()
    for names, shape in ((["z", "x"], "(2,)"), (["a", "b", "c", "d"], "(4,)"), ("abc", "()")):
        p = tmp_path / "n.npz"
        np.savez(p, t=t, x=x, names=np.array(names))
        _bad(tmp_path, capsys, [str(p)], f"'names' must list one name per variable, i.e. have shape (3,) for "
                                         f"'x' of shape (600, 3); got shape {shape}")


def test_npz_without_trajectories_or_variables(tmp_path, capsys):
    t = np.linspace(0, 1, 40)
    for x, what in ((np.zeros((0, 40, 2)), "no trajectories"), (np.zeros((40, 0)), "no variables")):
        p = tmp_path / "e.npz"
        np.savez(p, t=t, x=x)
        _bad(tmp_path, capsys, [str(p)], f"'x' holds {what}")


def test_csv_header_problems_and_missing_ids(tmp_path, capsys):
    rows = [(i, i, i) for i in range(50)]
    _bad(tmp_path, capsys, [write_csv(tmp_path / "a.csv", ["t", "", "y"], rows)], "column(s) [2] of the header have no name")
    rows = [("" if i == 5 else 0, i * 0.1, 2.0 ** (-i * 0.1)) for i in range(40)]
    _bad(tmp_path, capsys, [write_csv(tmp_path / "b.csv", ["trajectory", "t", "x"], rows)],
         "line 7: the trajectory id ('trajectory') is missing")


def test_csv_with_a_byte_order_mark(tmp_path, capsys):
    """Excel's "CSV UTF-8" starts with a byte-order mark, which must not become part of the first column's name."""
    t, x = lorenz_arrays()
    p = tmp_path / "bom.csv"
    p.write_text("t,x,y,z\n" + "".join(f"{ti},{a},{b},{c}\n" for ti, (a, b, c) in zip(t, x)), encoding="utf-8-sig")
    assert main(["discover", str(p), "--method", "sindy", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    assert "x' = " in capsys.readouterr().out


def test_bad_device_samples_and_out(tmp_path, capsys):
    _bad(tmp_path, capsys, ["--device", "foo"], "--device 'foo' is not a device")
    _bad(tmp_path, capsys, ["--samples", "31"], "--samples must be at least 32")
    f = tmp_path / "file"
    f.write_text("")
    code = main(["discover", "--quick", "--no-progress", "--out", str(f)])
    assert code == 2 and "exists and is not a directory" in capsys.readouterr().err
