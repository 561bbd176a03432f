"""Experiment tracking through the real libraries, with no network: MLflow's local file store and W&B's
offline mode, for a run that trains, evaluates and writes its report, then resumes. The run starts from
tiny Hugging Face checkpoints (test_hf.py builds them; the vision one a BEiT with relative position bias,
as VLMo starts): one training checks both, since each training through the CLI costs the suite half a
minute."""
import json
import os
import shutil

from conftest import pretrain_config, vlp
from test_hf import BEIT_RELATIVE, CAPTIONS, make_beit, make_bert

from pipeline.model import MultiwayTransformer


def test_a_tracked_run_from_hf_checkpoints_logs_config_training_curation_evaluation_and_report(tmp_path, toyweb,
                                                                                              reference_run):
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"   # mlflow 3 refuses its file store unless asked
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from pipeline.modelio import load_pretrained

    make_beit(tmp_path / "vision", **BEIT_RELATIVE)
    _, tok = make_bert(tmp_path / "text", CAPTIONS)
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.root, run_dir)
    steps, lr = 4, 1e-4
    init_from = {"vision": str(tmp_path / "vision"), "text": str(tmp_path / "text")}
    cfg_path = pretrain_config(tmp_path / "c.yaml", toyweb, stages=("download", "prefilter", "pretrain", "evaluate", "report"),
                               num_workers=1, steps=steps, lr=lr, warmup_steps=0, peak_tflops=2.0, log_every=2,
                               checkpoint_every=4, fusion_every=1, text_queue=0, itc_hard_negatives=0,
                               init_from=init_from)
    text = cfg_path.read_text() + f"tracking:\n  mlflow: {{}}\n  wandb: {{mode: offline, dir: {tmp_path / 'wandb'}}}\n"
    cfg_path.write_text(text)
    # through the CLI, a fresh Ray: a second TorchTrainer in the session's Ray can wait forever
    # (docs/architecture.md, "Ray Train in a long-lived Ray")
    vlp("run", str(cfg_path), "--run-dir", str(run_dir))

    # started from the checkpoints: the tokenizer is BERT's, the weights the BEiT's a few steps on
    stage = run_dir / "round-0" / "pretrain"
    assert json.loads((stage / "manifest.json").read_text())["init_from"] == init_from
    model, model_tok, _ = load_pretrained(stage / "model")
    assert model_tok.get_vocab() == tok.get_vocab()
    assert model.cfg.stem == "patch" and model.cfg.norm_eps == 1e-12 and model.cfg.rel_pos_bias == "layer"
    # Adam moves a weight by about lr per step
    start = load_file(str(tmp_path / "vision" / "model.safetensors"))["encoder.layer.0.attention.output.dense.weight"]
    moved = (model.blocks[0].attn.proj.weight - start).abs().max().item()
    assert moved < 3 * steps * lr, moved
    random_init = MultiwayTransformer(model.cfg).blocks[0].attn.proj.weight
    assert (random_init - start).abs().max().item() > 10 * steps * lr

    ids = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=str(run_dir / "mlruns"))
    experiment = client.get_experiment_by_name("test")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"test", "pretrain-r0"}
    pipeline_run, training = runs["test"], runs["pretrain-r0"]
    assert pipeline_run.info.run_id == ids["mlflow"]
    assert pipeline_run.data.params["pretrain.steps"] == "4" and pipeline_run.data.params["pretrain.model"] == "tiny"
    figures = pipeline_run.data.metrics
    assert figures["pretrain/samples_in"] > 0 and 0 <= figures["evaluate/itc_tr_r1"] <= 1
    assert {a.path for a in client.list_artifacts(ids["mlflow"], "report")} >= {"report/index.html"}
    assert training.data.tags["mlflow.parentRunId"] == ids["mlflow"]
    history = client.get_metric_history(training.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4]
    assert {"train/itc", "train/lr", "train/samples_per_s", "train/tflops", "train/mfu"} <= set(training.data.metrics)
    assert 0 < training.data.metrics["train/mfu"] < 1   # against the peak the config gives this CPU

    # W&B offline: one run folder for the pipeline, one for the training (its group's id, then the key);
    # their .wandb record files carry the keys logged (read as bytes: wandb 0.31 ships no Python reader)
    offline = tmp_path / "wandb" / "wandb"
    pipeline_records = b"".join(p.read_bytes() for p in offline.glob(f"offline-run-*-{ids['wandb']}/run-*.wandb"))
    training_records = b"".join(p.read_bytes() for p in offline.glob(f"offline-run-*-{ids['wandb']}-*/run-*.wandb"))
    assert b"evaluate/itc_tr_r1" in pipeline_records and b"prefilter/samples_kept" in pipeline_records   # committed before tracking began: logged too
    assert b"train/loss" in training_records and b"train/samples_per_s" in training_records

    # a resume logs into the same pipeline run and makes no new training run (nothing retrains)
    vlp("run", str(cfg_path), "--run-dir", str(run_dir))
    assert json.loads((run_dir / "tracking.json").read_text()) == ids
    assert {r.info.run_name for r in client.search_runs([experiment.experiment_id])} == {"test", "pretrain-r0"}
