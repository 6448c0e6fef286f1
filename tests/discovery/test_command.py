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


def test_system_ground_truth_follows_column_names(tmp_path, capsys):
    """--system with DATA whose columns are the system's variables in another order: compared by name."""
    t, x = lorenz_arrays()
    p = write_csv(tmp_path / "zyx.csv", ["t", "z", "y", "x"], [(ti, c, b, a) for ti, (a, b, c) in zip(t, x)])
    assert main(["discover", p, "--system", "lorenz", "--method", "sindy", "--no-progress",
                 "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "reordered" in out and "exact recovery" in out
    q = write_csv(tmp_path / "mixed.csv", ["t", "x", "b", "c"], [(ti, *xi) for ti, xi in zip(t, x)])
    _bad(tmp_path, capsys, [q, "--system", "lorenz"], "name the data's columns as the system's")


def test_time_unit_does_not_change_sindy(tmp_path, capsys):
    """The same Lotka-Volterra data with time in units 1000x longer: rates 1000x larger, found as well (the ridge
    prior follows the threshold's units, or the data's rates for 'cv')."""
    from scipy.integrate import solve_ivp

    def f(_t, s):
        return [s[0] - 0.5 * s[0] * s[1], -0.8 * s[1] + 0.4 * s[0] * s[1]]

    t = np.linspace(0, 20, 800)
    x = solve_ivp(f, (0, 20), [2, 1], t_eval=t, rtol=1e-10, atol=1e-10).y.T
    np.savez(tmp_path / "lv.npz", t=t * 1e-3, x=x, names=np.array([b"prey", b"pred"]))  # bytes names too
    for threshold in ("50", "cv"):
        assert main(["discover", str(tmp_path / "lv.npz"), "--method", "sindy", "--threshold", threshold,
                     "--no-progress", "--out", str(tmp_path / "o")]) == 0
        report = json.loads((tmp_path / "o" / "report.json").read_text())
        assert report["variables"] == ["prey", "pred"]
        c = np.array(report["methods"]["sindy"]["coefficients"])
        names = report["features"]
        expect = np.zeros_like(c)
        expect[0, names.index("prey")], expect[0, names.index("prey*pred")] = 1000, -500
        expect[1, names.index("pred")], expect[1, names.index("prey*pred")] = -800, 400
        assert np.abs(c - expect).max() < 5, (threshold, c)
    capsys.readouterr()


def test_more_malformed_inputs(tmp_path, capsys):
    t, x = lorenz_arrays(n=100)
    # 'T' (a temperature, say) next to a 'time' column: the column written 'time' is the time
    p = write_csv(tmp_path / "temp.csv", ["P", "T", "time"], [(a, b, ti) for ti, (a, b, _) in zip(t, x)])
    assert main(["discover", p, "--method", "sindy", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    assert "T' = " in capsys.readouterr().out
    p = write_csv(tmp_path / "two.csv", ["t", "time", "x"], [(ti, ti, a) for ti, (a, _, _) in zip(t, x)])
    _bad(tmp_path, capsys, [p], "several columns could be the time column ('t', 'time'); pass --time-column")
    p = write_csv(tmp_path / "ok.csv", ["t", "x", "y", "z"], [(ti, *xi) for ti, xi in zip(t, x)])
    _bad(tmp_path, capsys, [p, "--time-column", "t", "--id-column", "t"], "must differ")
    stacked = write_csv(tmp_path / "stacked.csv", ["t", "x", "y", "z"],
                        [(ti, *xi) for ti, xi in zip(t, x)] * 2)
    _bad(tmp_path, capsys, [stacked], "give them an id column")
    np.save(tmp_path / "a.npy", x)
    (tmp_path / "a.npy").rename(tmp_path / "a.npz")
    _bad(tmp_path, capsys, [str(tmp_path / "a.npz")], "not an NPZ archive")
    np.savez(tmp_path / "s.npz", t=t, x=np.array([["a"] * 3] * len(t)))
    _bad(tmp_path, capsys, [str(tmp_path / "s.npz")], "'x' must hold real numbers")
    np.savez(tmp_path / "c.npz", t=t, x=x.astype(complex))
    _bad(tmp_path, capsys, [str(tmp_path / "c.npz")], "'x' must hold real numbers, got dtype complex128")
    (tmp_path / "latin1.csv").write_bytes("t,x\n".encode() + "".join(f"{i},{i}\n" for i in range(40)).encode()
                                          + b"1,\xe9\n")
    _bad(tmp_path, capsys, [str(tmp_path / "latin1.csv")], "not UTF-8 text")
    f = tmp_path / "afile"
    f.write_text("")
    code = main(["discover", p, "--method", "sindy", "--no-progress", "--out", str(f / "sub")])
    assert code == 2 and "afile exists and is not a directory" in capsys.readouterr().err
    # --samples sizes simulated data only
    assert main(["discover", p, "--samples", "5", "--method", "sindy", "--no-progress",
                 "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()


def test_constant_data_report_is_strict_json_and_small_coefficients_print(tmp_path, capsys):
    from torchmech.discovery.base import format_equations
    import torch

    t = np.linspace(0, 1, 50)
    p = write_csv(tmp_path / "const.csv", ["t", "x"], [(ti, 1.0) for ti in t])
    assert main(["discover", p, "--method", "sindy", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    assert "undefined (the held-out data are constant)" in capsys.readouterr().out
    text = (tmp_path / "o" / "report.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert report["methods"]["sindy"]["trajectory_r2"] is None
    lines = format_equations(torch.tensor([[0.8, -0.0004, 0.0], [123456.0, 0.05, 2.0]]), ["N", "N^2", "1"], ["a", "b"])
    assert lines == ["a' = 0.800 N - 4.000e-04 N^2", "b' = 1.235e+05 N + 0.050 N^2 + 2.000"]


def test_numeric_column_names_are_refused(tmp_path, capsys):
    """A header t,0,1 (pandas' to_csv) printed "1' = -4.000 0 - 0.400": the term in variable "1" read as a
    constant."""
    t = np.linspace(0, 10, 400)
    rows = [(ti, np.cos(2 * ti), -2 * np.sin(2 * ti)) for ti in t]
    path = write_csv(tmp_path / "num.csv", ["t", "0", "1"], rows)
    assert main(["discover", path, "--method", "sindy", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert "'0' reads as a number" in capsys.readouterr().err


def test_an_equation_emptied_by_the_threshold_gets_a_note(tmp_path, capsys):
    """logistic growth x' = x - 0.1 x^2 at the default threshold lost every term silently."""
    code = main(["discover", "--system", "logistic", "--method", "sindy", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "x' = 0" in out and "note: every term of x' fell below the threshold" in out


def test_a_variable_named_like_an_id_column(tmp_path, capsys):
    """A drain current "Id" was taken as the trajectory id by its name, with an error about 1-sample trajectories
    that did not say why; --id-column none reads every column but time as a variable."""
    t = np.linspace(0, 10, 400)
    rows = [(ti, np.cos(2 * ti), -2 * np.sin(2 * ti)) for ti in t]
    path = write_csv(tmp_path / "dev.csv", ["t", "Vd", "Id"], rows)
    assert main(["discover", path, "--method", "sindy", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert "column 'Id' was taken as the trajectory id by its name" in capsys.readouterr().err
    code = main(["discover", path, "--method", "sindy", "--id-column", "none", "--no-progress", "--out",
                 str(tmp_path / "o")])
    assert code == 0 and "Id' = -4.000 Vd" in capsys.readouterr().out
