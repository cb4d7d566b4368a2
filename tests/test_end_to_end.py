"""`--mode=all` on a tiny synthetic config, then resume, through the real entry point."""

import glob
import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--synthetic_train=32", "--synthetic_val=8", "--synthetic_test=8", "--synthetic_frames=10",
        "--batch_size=4", "--steps_per_epoch=3", "--warmup_epochs=1", "--num_samples=6",
        "--recalibrate_batches=2", "--backbones=", "--generalize_epochs=1", "--generalize_seeds=1",
        "--progress=0"]


def _run(*args, cwd=ROOT):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "stfusion_tf.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def _main(tmp_path, *args):
    r = _run("--flagfile=configs/synthetic_motion.flags", f"--data_dir={tmp_path}/data",
             f"--model_dir={tmp_path}/run", *TINY, *args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def _tags(event_dir):
    import tensorflow as tf
    tags = set()
    for f in glob.glob(os.path.join(event_dir, "**", "events.out.tfevents.*"), recursive=True):
        for e in tf.compat.v1.train.summary_iterator(f):
            for v in e.summary.value:
                tags.add(v.tag)
    return tags


def test_mode_all_then_resume(tmp_path):
    out = _main(tmp_path, "--mode=all", "--epochs=2", "--eval_protocol=authors")
    run = tmp_path / "run"
    assert "[prepare]" in out and "[train]" in out and "[analyze]" in out and "[export]" in out
    for rel in ("template.keras", "train_summary.json", "analysis/report.md",
                "analysis/opt_strategy.json", "analysis/marginals.png", "analysis/marginals.csv",
                "analysis/ranking.jsonl", "export/probability_space/1/saved_model.pb",
                "export/classifier_opt/1/saved_model.pb"):
        assert (run / rel).exists(), rel
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 6
    # The export rebuilt the Opt network from the recorded template config.
    assert "template_config" in summary and "[export] classifier_opt: " in out
    opt = json.loads((run / "analysis/opt_strategy.json").read_text())
    kind = "template with masks" if "none" in opt["units"] else "gate-free DenseNet-3D"
    assert f"classifier_opt: {kind}" in out
    report = (run / "analysis/report.md").read_text()
    assert "Opt vs uniform" in report and "B4.L2" in report
    # Every accuracy carries its protocol: the authors' one clip x the full 40x40 frame
    # (the template trained on 32x32 crops).
    label = "authors: 8 frames (stride 1) x 1 clip x 1 crop of 40x40 (short side 40)"
    assert summary["eval"]["val"]["protocol"]["label"] == label
    assert f"video top-1 on test ({label})" in out and label in report
    comparison = json.loads((run / "analysis/comparison.json").read_text())
    assert {v["protocol"]["label"] for v in comparison.values()} == {label}
    rows = [json.loads(line) for line in (run / "analysis/ranking.jsonl").read_text().splitlines()]
    assert {r["protocol"] for r in rows} == {label}
    assert "BatchNorm re-calibration" in report and "Kendall" in report
    assert len((run / "analysis/ranking_bn_recalibrated.jsonl").read_text().splitlines()) == 6
    assert len((run / "analysis/ranking.jsonl").read_text().splitlines()) == 6
    tags = _tags(str(run / "tensorboard"))
    for tag in ("epoch_loss", "epoch_accuracy", "loss/regularizer", "loss/cross_entropy",
                "learning_rate", "drop_rate/S_branch", "marginals"):
        assert tag in tags, (tag, tags)
    # The run record: --model_dir alone is enough to analyse the run on its own geometry and
    # data (from another working directory); an explicit flag overrides it and says so; a
    # geometry the trained template cannot take is a one-line error.
    record = json.loads((run / "run.json").read_text())
    assert record["configs"]["input"]["num_frames"] == 8 and record["flags"]["data_dir"]
    r = _run("--mode=analyze", f"--model_dir={run}", "--num_samples=4", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[analyze]" in r.stdout and "--num_samples=4 overrides the run record's 6" in r.stdout
    assert len((run / "analysis/ranking.jsonl").read_text().splitlines()) == 4
    r = _run("--mode=analyze", f"--model_dir={run}", "--num_frames=16", cwd=str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "takes 8x32x32 clips" in r.stderr and "16x32x32" in r.stderr
    # Per-class evaluation of the selection split, and its confusion matrix in TensorBoard.
    classes = json.loads((run / "evaluation/val.json").read_text())
    assert sum(map(sum, classes["confusion_matrix"])) == classes["num_videos"] == 8
    assert "confusion_matrix/val" in _tags(str(run / "tensorboard" / "eval"))
    assert {"accuracy_vs_macs", "opt_confusion_matrix"} <= \
        _tags(str(run / "tensorboard" / "analysis"))
    # --mode=summary prints every sampled strategy's cost from the run's ranking.
    out = _main(tmp_path, "--mode=summary")
    sampled = json.loads(out)["sampled_strategies"]["strategies"]
    rows = [json.loads(l) for l in (run / "analysis/ranking.jsonl").read_text().splitlines()]
    assert len(sampled) == len({r["key"] for r in rows})
    assert {s["index"]: s["params"] for s in sampled} == \
        {r["index"]: r["params"] for r in rows if "duplicate_of" not in r}
    # Resume: one more epoch continues from the checkpoint of epoch 2.
    out = _main(tmp_path, "--mode=train", "--epochs=3")
    assert "[train]" in out
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 9
    # Fidelity: 3 ranked strategies trained stand-alone, rank correlation reported; re-running
    # resumes from fidelity.jsonl without training again.
    out = _main(tmp_path, "--mode=fidelity", "--fidelity_strategies=3", "--epochs=1")
    assert "[fidelity]" in out and ("Kendall" in out or "undefined" in out)
    fid = json.loads((run / "analysis/fidelity.json").read_text())
    assert fid["num_strategies"] == 3 and all(r["steps"] == 3 for r in fid["strategies"])
    assert fid["spearman_rho"] is None or -1.0 <= fid["spearman_rho"] <= 1.0
    mtimes = {p: p.stat().st_mtime for p in (run / "fidelity").glob("*/template.keras")}
    _main(tmp_path, "--mode=fidelity", "--fidelity_strategies=3", "--epochs=1")
    assert {p: p.stat().st_mtime for p in (run / "fidelity").glob("*/template.keras")} == mtimes

    # Generalisation (Table 6): small backbones x strategies, trained stand-alone, tabulated;
    # DenseNet takes the template's Opt itself, ResNet its marginals by relative depth.
    out = _main(tmp_path, "--mode=generalize", "--backbones=resnet_tiny,densenet_tiny",
                "--backbone_strategies=opt,S,ST", "--epochs=1")
    assert "[generalize]" in out
    table = json.loads((run / "analysis/generalization.json").read_text())
    assert table["backbones"] == ["resnet_tiny", "densenet_tiny"]
    assert len(table["results"]) == 6 and all(r["steps"] == 3 for r in table["results"])
    opt = json.loads((run / "analysis/opt_strategy.json").read_text())
    dense_opt = next(r for r in table["results"] if r["backbone"] == "densenet_tiny" and r["spec"] == "opt")
    if "none" not in opt["units"]:
        assert dense_opt["code"] == opt["code"]
    md = (run / "analysis/generalization.md").read_text()
    assert "| resnet_tiny |" in md and "| Transferred | S | ST |" in md
    assert "Evaluation protocol: " in md and " x 1 clip x 1 crop of " in md
    assert "generalization" in _tags(str(run / "tensorboard" / "generalize"))

    # TFLite: the template's S+ST classifier, and a trained backbone through --export_model.
    out = _main(tmp_path, "--mode=export", "--strategy=S+ST", "--tflite")
    assert "classifier_S_plus_ST.tflite" in out
    for name in ("classifier_S_plus_ST.tflite", "classifier_S_plus_ST.json"):
        assert (run / "export" / "tflite" / name).exists(), name
    backbone = run / "generalize" / "resnet_tiny" / "S" / "model.keras"
    out = _main(tmp_path, "--mode=export", f"--export_model={backbone}", "--tflite")
    assert (run / "export/classifier_resnet_tiny_S/1/saved_model.pb").exists()
    meta = json.loads((run / "export/tflite/classifier_resnet_tiny_S.json").read_text())
    assert meta["max_abs_diff_vs_keras"] <= 1e-4
