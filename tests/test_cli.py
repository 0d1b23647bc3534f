"""The `omnirouter` command-line contracts other tools rely on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from router.model import LABELS, SEVERITIES


def omnirouter(
    *args: str, stdin: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_classify_reads_json_and_plain_lines_and_answers_in_order() -> None:
    lines = [
        json.dumps(
            {"id": "a", "text": "你们的快递太慢了，我要投诉，要求退款五千元"}, ensure_ascii=False
        ),
        "Where can I download my invoice?",
        json.dumps({"id": 7, "text": "It would be great if the app had a dark mode", "lang": "en"}),
        "",
        "not json {",
    ]
    result = omnirouter("classify", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(out) == 4  # the blank line is skipped, everything else answered in order
    assert [o.get("id") for o in out] == ["a", None, 7, None]
    for o in out:
        assert o["label"] in LABELS and o["severity"] in SEVERITIES
        assert set(o["scores"]) == set(LABELS)
        assert abs(sum(o["scores"].values()) - 1) < 0.01
        assert 0 <= o["confidence"] <= 1 and isinstance(o["signals"], list)
    assert [o["label"] for o in out[:3]] == ["complaint", "inquiry", "suggestion"]
    assert {s["kind"] for s in out[0]["signals"]} == {"amount_over_threshold"}


def test_output_into_a_pipe_whose_reader_went_ends_quietly(tmp_path: Path) -> None:
    # `omnirouter classify < big | head -1`: when head exits, the next write fails.
    # A Unix tool ends there, quietly, with the status a shell gives SIGPIPE (141).
    lines = tmp_path / "lines.txt"
    lines.write_text("where is my order\n" * 20_000)
    with lines.open() as stdin:
        proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "classify"],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        assert json.loads(proc.stdout.readline())["label"] in LABELS
        proc.stdout.close()  # the reader goes, with most of the output still to come
        with proc.stderr:
            errors = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141
    assert "Traceback" not in errors and "BrokenPipeError" not in errors, errors


def test_rules_classifier_can_be_chosen_in_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{tmp_path}"\n[classifier]\nmodel = "rules"\n'
        '[[adapters]]\ntype = "inbox"\nname = "inbox"\n'
    )
    result = omnirouter("classify", "-c", str(cfg), stdin="Where is my parcel?\n")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model_version"].startswith("rules")


def test_config_check_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[[adapters]]\ntype = "inbox"\nname = "inbox"\n')
    ok = omnirouter("config", "check", str(good))
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[ops]\nport = 99999\n")
    failed = omnirouter("config", "check", str(bad))
    assert failed.returncode == 11
    assert "ops.port" in failed.stderr and "line 2" in failed.stderr


def test_classifier_train_and_eval_round_trip(tmp_path: Path) -> None:
    data = tmp_path / "tickets.jsonl"
    rows = [
        ("Where is my order?", "inquiry"),
        ("How do I reset my password?", "inquiry"),
        ("请问什么时候发货？", "inquiry"),
        ("This is the worst service, I want my money back", "complaint"),
        ("你们的客服态度太差了，我要投诉", "complaint"),
        ("The parcel arrived broken and nobody answers", "complaint"),
        ("Please add an export to CSV", "suggestion"),
        ("建议增加夜间模式", "suggestion"),
        ("It would be nice to pay with Alipay", "suggestion"),
    ]
    data.write_text(
        "".join(json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n" for t, lab in rows)
    )
    model = tmp_path / "m.bin"
    trained = omnirouter(
        "classifier", "train", "--data", str(data), "--out", str(model), "--seed", "3"
    )
    assert trained.returncode == 0, trained.stderr
    assert model.stat().st_size > 0
    evaluated = omnirouter(
        "classifier", "eval", "--data", str(data), "--model", str(model), "--json"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)["model"]
    assert 0 <= report["overall"]["macro_f1"] <= 1
