"""Real training runs through train.py: DeepSpeed ranks agree, resume is exact, losses fall.

Each run is a subprocess (`deepspeed` launcher or plain `python`) on the CPU with gloo, as a
user would start it.
"""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.launch import clean_env, run_deepspeed, run_python, run_srun_like
pytestmark = pytest.mark.slow

# A model small enough for several runs per test on 2 cores; dropout off where runs must agree.
SMALL = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=4",
         "model.intermediate_size=128", "model.pixel_samples=6", "data.image_shorter=128",
         "data.image_longer=160", "data.max_text_len=20", "train.log_every=1", "train.warmup_steps=1",
         # Two captions per image: the grouped path (one CNN pass, in-batch negatives) is what runs.
         "data.captions_per_image=2",
         # The paper's split (SGD for the CNN, AdamW for the rest), so ZeRO and resume are proven on it.
         "train.backbone_optimizer=sgd", "train.lr=0.001", "train.backbone_lr=0.01"]
NO_DROPOUT = ["model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0"]


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def train_args(out: Path, synthetic: Path, overrides: list[str]) -> list[str]:
    """train.py's arguments for a tiny run into `out` on the module's synthetic set."""
    # Runs on the same synthetic set share one vocabulary cache beside it (never the user's ~/.cache).
    return ["train.py", "--config", "configs/tiny.json", f"train.output_dir={out}", f"data.synthetic_dir={synthetic}",
            f"data.tokenizer_cache={synthetic.parent / 'tokenizers'}", "data.synthetic_images=96",
            # a CNN from scratch unless a test names one; validation only where a test asks for it
            "model.backbone_weights=null", "train.eval_every=0", *overrides]


def launch(out: Path, synthetic: Path, overrides: list[str], ranks: int = 1,
           timeout: int = 900) -> subprocess.CompletedProcess:
    args = train_args(out, synthetic, overrides)
    env = clean_env(PYTHONUNBUFFERED="1")
    if ranks == 1:
        return run_python(args, env, timeout)
    return run_deepspeed(args, ranks, env, timeout)


def run_train(out: Path, synthetic: Path, overrides: list[str], ranks: int = 1, timeout: int = 900) -> list[dict]:
    result = launch(out, synthetic, overrides, ranks, timeout)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(result.args)} failed ({result.returncode}):\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict], key: str = "loss") -> list[float]:
    return [r[key] for r in records]


def test_two_ranks_zero1_2_3_match_one_rank(tmp_path, synthetic_dir):
    common = SMALL + NO_DROPOUT + ["train.max_steps=4", "data.num_workers=0"]
    one = run_train(tmp_path / "one", synthetic_dir, common + [
        "deepspeed.train_micro_batch_size_per_gpu=4", "deepspeed.gradient_accumulation_steps=2",
        "deepspeed.zero_optimization.stage=0"])
    validations = {}
    for stage in (1, 2, 3):
        # Validation on: the ranks split it; under ZeRO-3 rank 1 makes a filler pass to match rank 0.
        two = run_train(tmp_path / f"zero{stage}", synthetic_dir, common + [
            "deepspeed.train_micro_batch_size_per_gpu=4", "deepspeed.gradient_accumulation_steps=1",
            f"deepspeed.zero_optimization.stage={stage}", "train.eval_every=2", "train.eval_records=20"], ranks=2)
        assert [r["step"] for r in two] == [1, 2, 3, 4]
        # grad_norm: computed by the engine on one rank without ZeRO, by DeepSpeed's ZeRO optimiser
        # (which clips at 1.0) on two: the same pre-clip global norm of the averaged gradients.
        for key in ("loss", "mlm_loss", "itm_loss", "grad_norm"):
            assert losses(two, key) == pytest.approx(losses(one, key), rel=1e-4, abs=1e-5), (stage, key)
        assert losses(two, "mlm_acc") == losses(one, "mlm_acc")
        validations[stage] = eval_lines(tmp_path / f"zero{stage}")
    # ZeRO-Offload: the optimiser steps the CPU partitions with the engine's own kernels.
    offloaded = run_train(tmp_path / "offload", synthetic_dir, common + [
        "deepspeed.train_micro_batch_size_per_gpu=4", "deepspeed.gradient_accumulation_steps=1",
        "deepspeed.zero_optimization.stage=2", 'deepspeed.zero_optimization.offload_optimizer={"device": "cpu"}'],
        ranks=2)
    for key in ("loss", "mlm_loss", "itm_loss", "grad_norm"):
        assert losses(offloaded, key) == pytest.approx(losses(one, key), rel=1e-4, abs=1e-5), ("offload", key)
    # The 20 val captions' 5 images make three batches, two on rank 0 and one on rank 1.
    for stage in (1, 2):
        assert list(validations[stage]) == list(validations[3]) == [2, 4]
        for step in (2, 4):
            numbers = [{k: v for k, v in validations[s][step].items() if k not in ("eval_s", "skipped")}
                       for s in (stage, 3)]
            assert numbers[0] == pytest.approx(numbers[1], rel=1e-4, abs=1e-5), (stage, step)
    # The runs learned something in four steps, so agreeing was not trivial.
    assert len(set(losses(one))) == 4


def test_contrastive_loss_on_two_ranks_is_the_global_batchs(tmp_path, synthetic_dir):
    """Retrieval with the contrastive loss: each rank gathers the others' vectors and texts, so
    two ranks of four items train exactly as one rank of eight (losses at every step, hence
    gradients too). Frozen BatchNorm, so that the CNN does not depend on how the batch is split."""
    common = SMALL + NO_DROPOUT + ["train.max_steps=3", "data.num_workers=0", "train.task=retrieval",
                                   "task.contrastive_weight=1", "task.negatives=3", "task.hard_negatives=2",
                                   "model.frozen_bn=true"]
    one = run_train(tmp_path / "one", synthetic_dir, common + ["deepspeed.train_micro_batch_size_per_gpu=8"])
    two = run_train(tmp_path / "two", synthetic_dir, common + ["deepspeed.train_micro_batch_size_per_gpu=4",
                                                              "deepspeed.zero_optimization.stage=2"], ranks=2)
    # Tight: without the gradient's world-size factor (so with half the contrastive gradient)
    # the losses of steps 2 and 3 moved by 8e-5 relative; ranks that agree differ by under 1e-6.
    for key in ("loss", "itm_loss", "itc_loss"):
        assert losses(two, key) == pytest.approx(losses(one, key), rel=1e-5, abs=1e-6), key
    assert len(set(losses(one, "itc_loss"))) == 3  # it trained: agreeing was not trivial


def test_srun_tasks_train_as_two_ranks(tmp_path, synthetic_dir):
    """`srun -n 2 python train.py` (SLURM's variables, none of torch's): the two tasks form one
    two-rank group, training as one rank with twice the accumulation, and the step's exit code
    is theirs. Before, each took itself for a one-rank run and both wrote one output folder."""
    common = SMALL + NO_DROPOUT + ["train.max_steps=2", "data.num_workers=0", "deepspeed.zero_optimization.stage=2"]
    one = run_train(tmp_path / "one", synthetic_dir, common + ["deepspeed.train_micro_batch_size_per_gpu=4",
                                                              "deepspeed.gradient_accumulation_steps=2"])
    tasks = run_srun_like(train_args(tmp_path / "srun", synthetic_dir, common + [
        "deepspeed.train_micro_batch_size_per_gpu=4", "deepspeed.gradient_accumulation_steps=1"]), 2,
        clean_env(PYTHONUNBUFFERED="1"))
    assert [task.returncode for task in tasks] == [0, 0], [task.stderr[-3000:] for task in tasks]
    assert "2 ranks started by SLURM step 4242.0; rank 0 at localhost:" in tasks[0].stderr
    two = [json.loads(line) for line in (tmp_path / "srun" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2]  # one writer: rank 0
    for key in ("loss", "mlm_loss", "itm_loss", "grad_norm"):
        assert losses(two, key) == pytest.approx(losses(one, key), rel=1e-4, abs=1e-5), key
    assert losses(one)[0] != losses(one)[1]  # it trained: agreeing was not trivial


def eval_lines(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "eval.jsonl").read_text().splitlines())}


def same_eval(a: dict, b: dict) -> bool:
    numbers = lambda report: {k: v for k, v in report.items() if k not in ("eval_s", "skipped")}  # noqa: E731
    return a["skipped"] == b["skipped"] and numbers(a) == pytest.approx(numbers(b), rel=1e-6, abs=1e-7)


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, synthetic_dir):
    # Dropout on and a worker process: resume must restore RNG and data position exactly.
    # Validation on: it must not change training, and its log resumes like metrics.jsonl.
    common = SMALL + ["train.max_steps=6", "train.save_every=3", "data.num_workers=1",
                      "deepspeed.train_micro_batch_size_per_gpu=4", "train.eval_every=2", "train.eval_records=12",
                      "model.hidden_dropout_prob=0.1", "model.attention_probs_dropout_prob=0.1"]
    straight = run_train(tmp_path / "straight", synthetic_dir, common)
    interrupted = tmp_path / "interrupted"
    first = run_train(interrupted, synthetic_dir, common + ["train.stop_at_step=3"])
    assert [r["step"] for r in first] == [1, 2, 3]
    (interrupted / "metrics.jsonl").write_text(
        (interrupted / "metrics.jsonl").read_text() + json.dumps({"step": 4, "loss": -1.0}) + "\n")
    result = launch(interrupted, synthetic_dir, common + ["train.resume=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    assert "the config differs" not in result.stdout + result.stderr  # stop_at_step and resume only
    resumed = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # the stale step-4 line is gone
    for key in ("loss", "mlm_loss", "itm_loss", "mlm_acc", "itm_acc", "lr", "backbone_lr"):
        assert losses(resumed, key) == pytest.approx(losses(straight, key), rel=1e-6, abs=1e-7), key
    assert (interrupted / "checkpoints" / "latest").read_text() == "step_6"
    straight_eval, resumed_eval = eval_lines(tmp_path / "straight"), eval_lines(interrupted)
    assert list(straight_eval) == [2, 4, 6] and list(resumed_eval) == [2, 3, 4, 6]  # 3: the stop
    assert all(same_eval(resumed_eval[s], straight_eval[s]) for s in (2, 4, 6))
    assert {"mlm_loss", "itm_loss", "mlm_acc", "itm_acc"} <= set(straight_eval[6])
    assert 1 < straight_eval[6]["images"] < 12  # the images of the first 12 val captions
    assert straight_eval[2]["mlm_loss"] != straight_eval[6]["mlm_loss"]
    # Resumed with settings that change what it computes: refused under resume_strict, else it
    # goes on and says which.
    changed = ["train.resume=true", "train.max_steps=7", "data.mlm_probability=0.25"]
    result = launch(interrupted, synthetic_dir, common + changed + ["train.resume_strict=true"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "config error: train.resume_strict" in result.stderr and "train.max_steps: 6 -> 7" in result.stderr
    assert (interrupted / "checkpoints" / "latest").read_text() == "step_6"
    result = launch(interrupted, synthetic_dir, common + changed + ["train.log_every=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    warning = next(line for line in (result.stdout + result.stderr).splitlines() if "the config differs" in line)
    assert warning.endswith("data.mlm_probability: 0.3 -> 0.25; train.max_steps: 6 -> 7"), warning


@pytest.mark.parametrize("task, records, decoder, evaluated, extra", [
    ("vqa", 10, "pil", 10, []), ("nlvr2", 10, "pil", 10, []), ("retrieval", 15, "pil", 3, []),
    ("retrieval", 15, "pil", 3, ["task.contrastive_weight=1", "task.shortlist=2",
                                         "task.retrieval_folds=2"]),
    ("vqa", 10, "dali", 10, []), ("pretrain", 25, "dali", 5, [])])
def test_zero3_validation_of_each_task_makes_equal_passes_and_matches_zero2(tmp_path, synthetic_dir, task, records,
                                                                           decoder, evaluated, extra):
    """Under ZeRO-3 every forward pass gathers parameters on all ranks, so a rank with less of
    the split makes filler passes: here five batches of two records (three images for
    retrieval: three passes; five images for pre-training: three batches of up to two), split
    unevenly; with DALI the filler is decoded too; retrieval's shortlists (of unequal lengths)
    are padded alike on every rank. ZeRO-2 and ZeRO-3 train alike, so their validations agree."""
    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
    common = SMALL + NO_DROPOUT + ["train.max_steps=2", "data.num_workers=0", "deepspeed.train_micro_batch_size_per_gpu=4",
                                   f"train.task={task}", "task.min_answer_count=1", "train.eval_every=2",
                                   f"train.eval_records={records}", "train.eval_batch_size=2",
                                   f"data.decoder={decoder}", *extra]
    reports = {}
    for stage in (2, 3):
        run_train(tmp_path / f"zero{stage}", synthetic_dir, common + [f"deepspeed.zero_optimization.stage={stage}"],
                  ranks=2, timeout=300)
        reports[stage] = {k: v for k, v in eval_lines(tmp_path / f"zero{stage}")[2].items()
                          if k not in ("eval_s", "results_file", "rankings_file")}
    if task == "pretrain":  # losses: equal to rounding (ZeRO-3 reduces in another order)
        assert same_eval(reports[3], reports[2]), reports
    else:  # accuracies and recalls of argmax predictions and rankings: exactly
        assert reports[3] == reports[2]
    if task == "retrieval":  # validation's rankings file, named by its step: the same matches, in order
        lists = [json.loads((tmp_path / f"zero{stage}" / "retrieval_val_step2_rankings.json").read_text())
                 for stage in (2, 3)]
        for key, named in (("image_to_text", "text"), ("text_to_image", "image")):
            assert [[m[named] for m in best] for best in lists[1][key]] == \
                [[m[named] for m in best] for best in lists[0][key]]
        assert [m["score"] for best in lists[1]["image_to_text"] for m in best] == \
            pytest.approx([m["score"] for best in lists[0]["image_to_text"] for m in best], rel=1e-5, abs=1e-6)
    assert reports[3].get("questions", reports[3].get("statements", reports[3].get("images"))) == evaluated


@pytest.mark.parametrize("stage, kernel", [(2, "foreach"), (3, "fused")])
def test_zero_two_rank_resume_equals_uninterrupted(tmp_path, synthetic_dir, stage, kernel):
    # Partitioned optimiser state and gradients, and one RNG file per rank; each optimiser
    # kernel resumes its own state (torch's fused kernels run on the CPU too).
    # Validation on: under ZeRO-3 every rank must run its forward passes (parameter gathers).
    # Retention on: keeping one checkpoint deletes the step-2 one (every rank's files) only after
    # step 4's is complete, and the resumed run still starts from step 2.
    common = SMALL + ["train.max_steps=4", "train.save_every=2", "data.num_workers=0", "train.keep_checkpoints=1",
                      "deepspeed.train_micro_batch_size_per_gpu=4", f"deepspeed.zero_optimization.stage={stage}",
                      f"train.optimizer_kernel={kernel}", "train.eval_every=2", "train.eval_records=8"]
    straight = run_train(tmp_path / "straight", synthetic_dir, common, ranks=2)
    run_train(tmp_path / "interrupted", synthetic_dir, common + ["train.stop_at_step=2"], ranks=2)
    resumed = run_train(tmp_path / "interrupted", synthetic_dir, common + ["train.resume=true"], ranks=2)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6, abs=1e-7)
    for run in ("straight", "interrupted"):
        left = sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir() if not p.name.endswith(".py"))
        assert left == ["latest", "step_4"]  # beside DeepSpeed's conversion script (zero_to_torch.py)
    straight_eval, resumed_eval = eval_lines(tmp_path / "straight"), eval_lines(tmp_path / "interrupted")
    assert list(straight_eval) == list(resumed_eval) == [2, 4]
    for step in (2, 4):
        assert same_eval(resumed_eval[step], straight_eval[step]), (step, resumed_eval[step], straight_eval[step])


def test_a_resume_on_another_number_of_ranks_says_so(tmp_path, synthetic_dir):
    """The global batch (so the data stream) follows the number of ranks: a resume on more or
    fewer ranks goes on with a warning naming the change (the rank the saving run lacked starts
    from its own random state), and train.resume_strict refuses it. (ZeRO partitions resume on
    another number of ranks too, through the universal layout: the next test.)"""
    common = SMALL + ["train.max_steps=4", "data.num_workers=0", "deepspeed.train_micro_batch_size_per_gpu=4"]
    run = tmp_path / "run"
    run_train(run, synthetic_dir, common + ["train.stop_at_step=2"])
    strict = launch(run, synthetic_dir, common + ["train.resume=true", "train.resume_strict=true",
                                                  "train.stop_at_step=3"], ranks=2, timeout=300)
    assert strict.returncode != 0 and "config error: train.resume_strict" in strict.stderr
    assert "ranks: 1 -> 2 (a step's pairs: 4 -> 8)" in strict.stderr
    grown = launch(run, synthetic_dir, common + ["train.resume=true", "train.stop_at_step=3"], ranks=2, timeout=300)
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert "ranks: 1 -> 2 (a step's pairs: 4 -> 8)" in grown.stdout + grown.stderr
    # Fewer ranks, more accumulation: the same pairs a step, but still named (the ranks' random streams differ).
    shrunk = launch(run, synthetic_dir, common + ["train.resume=true", "deepspeed.gradient_accumulation_steps=2"])
    assert shrunk.returncode == 0, shrunk.stderr[-3000:]
    assert "deepspeed.gradient_accumulation_steps: 1 -> 2; ranks: 2 -> 1 (a step's pairs: 8 -> 8)" \
        in shrunk.stdout + shrunk.stderr
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_resume_under_another_zero_stage_goes_on_or_says_why_not(tmp_path, synthetic_dir):
    """ZeRO-1 and 2 write the same files: a resume from one under the other logs the
    uninterrupted run's losses. Between stage 0, 1/2 and 3 DeepSpeed's files differ (left to
    DeepSpeed, a traceback or a missing-file error): the run stops with the stages, the way on
    and exit 2."""
    common = SMALL + NO_DROPOUT + ["train.max_steps=4", "train.save_every=2", "data.num_workers=0",
                                   "deepspeed.train_micro_batch_size_per_gpu=4"]
    straight = run_train(tmp_path / "straight", synthetic_dir, common + ["deepspeed.zero_optimization.stage=2"])
    run = tmp_path / "run"
    run_train(run, synthetic_dir, common + ["deepspeed.zero_optimization.stage=2", "train.stop_at_step=2"])
    for stage in (3, 0):
        refused = launch(run, synthetic_dir, common + [f"deepspeed.zero_optimization.stage={stage}", "train.resume=true"])
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert f"written under ZeRO stage 2, this run uses stage {stage}" in refused.stderr
        assert f"task.init_from={run / 'checkpoints' / 'step_2'}" in refused.stderr
    resumed = run_train(run, synthetic_dir, common + ["deepspeed.zero_optimization.stage=1", "train.resume=true"])
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resumes_on_another_number_of_ranks_through_the_universal_layout(tmp_path, synthetic_dir, stage):
    """A ZeRO-2 or ZeRO-3 checkpoint of two ranks resumes on one and one of one rank on two: the
    main rank converts the partitions (AdamW's moments and step, SGD's momentum, the fp32
    weights, the frozen stem) to DeepSpeed's universal layout, which loads on any rank count.
    With the global batch kept (one rank accumulates two micro-batches) the resumed steps log
    the uninterrupted run's losses, which they would not with any optimiser state lost (seen:
    AdamW's moments zeroed moved step 4's loss by 1.6 %). The resumes start from another run's
    weights (task.init_from, another seed), so only what the checkpoint restores can make them
    agree: the frozen stem and BatchNorm's running statistics included. Those end as in the
    same resume without ZeRO, where DeepSpeed loads the whole model file."""
    from pixelbert.engine.weights import model_state_dict
    common = SMALL + NO_DROPOUT + ["train.max_steps=5", "train.save_every=2", "data.num_workers=0",
                                   "deepspeed.train_micro_batch_size_per_gpu=4", "model.freeze_stem=true"]
    zero = [f"deepspeed.zero_optimization.stage={stage}"]
    batch = {2: ["deepspeed.gradient_accumulation_steps=1"], 1: ["deepspeed.gradient_accumulation_steps=2"]}
    run_train(tmp_path / "elsewhere", synthetic_dir, common + ["train.seed=7", "train.max_steps=1"])
    elsewhere = f"task.init_from={tmp_path / 'elsewhere' / 'checkpoints'}"

    def interrupted_and_resumed(name: str, first: int, then: int, stage_args: list[str]) -> list[dict]:
        run = tmp_path / name
        run_train(run, synthetic_dir, common + stage_args + batch[first] + ["train.stop_at_step=2"], ranks=first)
        result = launch(run, synthetic_dir, common + stage_args + batch[then] + ["train.resume=true", elsewhere],
                        ranks=then, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        said = result.stdout + result.stderr
        assert f"ranks: {first} -> {then} (a step's pairs: 8 -> 8)" in said
        if stage_args == zero:
            assert f"ZeRO-{stage} partitions of {first} ranks: resuming on {then} through DeepSpeed's universal" in said
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    straight = run_train(tmp_path / "straight", synthetic_dir, common + zero + batch[2], ranks=2)
    assert len(set(losses(straight))) == 5  # it trained: agreeing is not trivial
    for name, first, then in (("shrunk", 2, 1), ("grown", 1, 2)):
        resumed = interrupted_and_resumed(name, first, then, zero)
        assert (tmp_path / name / "checkpoints" / "step_2" / "zero" / "optimizer_state.pt").exists()
        assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
        for key in ("loss", "mlm_loss", "itm_loss", "grad_norm"):
            assert losses(resumed, key) == pytest.approx(losses(straight, key), rel=1e-4, abs=1e-5), (name, key)
    # One rank accumulating two micro-batches updates the running statistics twice a step, two
    # ranks once each, so the reference is the same 2 -> 1 resume without ZeRO partitions.
    interrupted_and_resumed("shrunk_zero0", 2, 1, ["deepspeed.zero_optimization.stage=0"])
    final, expected = model_state_dict(tmp_path / "shrunk"), model_state_dict(tmp_path / "shrunk_zero0")
    statistics = [k for k in expected if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.allclose(final[k], expected[k], rtol=1e-4, atol=1e-6) for k in statistics)
    stem = model_state_dict(tmp_path / "elsewhere")["pixel_embeddings.backbone.conv1.weight"]
    assert not torch.equal(final["pixel_embeddings.backbone.conv1.weight"], stem)  # the checkpoint's, not init_from's


def test_bf16_zero2_resumes_on_fewer_ranks(tmp_path, synthetic_dir):
    """The shipped configs' combination (bf16, ZeRO-2: bf16 weights, fp32 partitions), two ranks
    resumed on one: the losses of the uninterrupted run to bf16's rounding (seen: 3e-5 apart)."""
    common = SMALL + NO_DROPOUT + ["train.max_steps=4", "train.save_every=2", "data.num_workers=0",
                                   "deepspeed.train_micro_batch_size_per_gpu=4", "deepspeed.zero_optimization.stage=2",
                                   'deepspeed.bf16={"enabled": true}']
    straight = run_train(tmp_path / "straight", synthetic_dir, common, ranks=2)
    run_train(tmp_path / "shrunk", synthetic_dir, common + ["train.stop_at_step=2"], ranks=2)
    assert (tmp_path / "shrunk" / "checkpoints" / "step_2" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    resumed = run_train(tmp_path / "shrunk", synthetic_dir,
                        common + ["train.resume=true", "deepspeed.gradient_accumulation_steps=2"])
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-3), (losses(resumed), losses(straight))


@pytest.mark.parametrize("metric, mode", [("itm_acc", "max"), ("mlm_loss", "min")])
def test_best_validation_keeps_its_checkpoint(tmp_path, synthetic_dir, metric, mode):
    """train.best_metric: a validation better than every earlier one saves a checkpoint named in
    best.json, which keep_checkpoints never deletes; the others go as usual. (Seen: ITM accuracy
    flat over five steps, so the first stays best; MLM loss falling, so each is the new best.)"""
    from pixelbert.engine.weights import model_state_dict
    run = tmp_path / "run"
    run_train(run, synthetic_dir, SMALL + ["train.max_steps=5", "data.num_workers=0", "train.eval_every=1",
                                           "train.eval_records=8", "train.keep_checkpoints=1",
                                           f"train.best_metric={metric}", f"train.best_mode={mode}",
                                           "deepspeed.train_micro_batch_size_per_gpu=4"])
    value = {step: report[metric] for step, report in eval_lines(run).items()}
    sign = 1 if mode == "max" else -1
    best_step = max(value, key=lambda step: (sign * value[step], -step))  # the first of equal bests
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best == {"tag": f"step_{best_step}", "step": best_step, "metric": metric,
                    "value": pytest.approx(value[best_step])}
    left = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert left == sorted({f"step_{best_step}", "step_5"})
    assert len(model_state_dict(run / "checkpoints" / best["tag"])) > 50


def test_export_gathers_a_zero3_checkpoint_into_a_folder_that_evaluates_alike(tmp_path, synthetic_dir):
    """pixelbert.tools.export: a two-rank ZeRO-3 VQA checkpoint (weights partitioned in the
    optimiser states) becomes one safetensors file with the run's config, vocabulary and answers;
    its tensors are the checkpoint's fp32 weights (bf16 on request), and the CLI evaluation of the
    folder is the run's."""
    from pixelbert.engine.weights import model_state_dict
    from pixelbert.tools.export import main as export_main
    run = tmp_path / "run"
    run_train(run, synthetic_dir, SMALL + ["train.max_steps=2", "data.num_workers=0", "train.task=vqa",
                                           "task.min_answer_count=1", "deepspeed.train_micro_batch_size_per_gpu=4",
                                           "deepspeed.zero_optimization.stage=3"], ranks=2)
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "export")]) == 0
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "half"), "--dtype", "bf16"]) == 0
    original = model_state_dict(run)
    exported = model_state_dict(tmp_path / "export" / "model.safetensors")
    half = model_state_dict(tmp_path / "half" / "model.safetensors")
    assert exported.keys() == original.keys() == half.keys() and len(original) > 50
    assert all(torch.equal(exported[k], original[k]) for k in original)
    assert all(torch.equal(half[k], original[k].to(torch.bfloat16)) for k in original if original[k].is_floating_point())
    assert (tmp_path / "export" / "answers.txt").read_text() == (run / "answers.txt").read_text()
    reports = []
    for config, checkpoint in ((run / "config.json", run), (tmp_path / "export" / "config.json",
                                                             tmp_path / "export" / "model.safetensors")):
        result = run_python(["-m", "pixelbert.evaluate", "--config", str(config), "--checkpoint", str(checkpoint)],
                            clean_env(OMP_NUM_THREADS="1"), timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((Path(json.loads(config.read_text())["train"]["output_dir"]) / "eval_vqa_val.json").read_text())
        reports.append({k: v for k, v in report.items() if k not in ("eval_s", "checkpoint", "results_file")})
    assert reports[0] == reports[1] and "overall" in reports[0]


def mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_tiny_training_lowers_mlm_and_itm_loss(tmp_path):
    """The README's first command, stopped early: the synthetic-label CNN
    (pixelbert.tools.pretrain_backbone, its defaults), then configs/tiny.json as shipped on the
    full synthetic set, stopped at step 3,000 of its 6,000-step schedule, validating every 500
    steps as it ships. MLM falls from 6.8 (step 10) to ~0.5. ITM sits at ln 2 until its escape
    from the saddle the README explains; the moment varies from run to run of the same command
    (float rounding differs between runs and the saddle amplifies it). At train.lr=1e-3, the
    earlier shipped rate, it came at steps ~2,400-4,100 and in one CI run (2026-12-01) not by
    step 5,000, failing this test; at 5e-4, shipped since, it came at ~1,850-1,950 in three
    engine runs on one thread (one with train.backbone_lr=2e-5), at ~1,650 in this test on two
    (ITM 0.35 / 82 % over the last ten logs at 5,000) and at ~1,800 in the CI run after it, with
    ITM below 0.5 about 400 steps later; the engine runs were at ITM 0.41-0.42 (training) and
    0.42 / 79 % (val captions) by 3,000. ITM was at 0.53 some 300 steps after its escape, so an
    escape as late as ~2,600 (1.35 times the latest seen at 5e-4) still passes. Stopped at 3,000
    (5,000, then 3,500, until 2026-12-02): on the slowest host seen the suite took 53 minutes,
    this test 27 of them."""
    data, cnn = tmp_path / "synthetic", tmp_path / "tiny-cnn.pth"
    pretrain = run_python(["-m", "pixelbert.tools.pretrain_backbone", "--synthetic", str(data), "--out", str(cnn)],
                          timeout=1200)
    assert pretrain.returncode == 0, pretrain.stderr[-3000:]
    records = run_train(tmp_path / "tiny", data, [
        "data.synthetic_images=2000", f"model.backbone_weights={cnn}", "train.stop_at_step=3000",
        "train.save_every=0", "train.eval_every=500"], timeout=2700)
    assert records[-1]["step"] == 3000
    start, end = records[:10], records[-10:]  # steps 10-100 and 2,910-3,000
    print({k: (round(mean(start, k), 3), round(mean(end, k), 3)) for k in ("mlm_loss", "mlm_acc", "itm_loss", "itm_acc")})
    assert mean(start, "mlm_loss") > 3.5 and mean(end, "mlm_loss") < 1.2
    assert mean(end, "mlm_acc") > 0.6
    assert 0.67 < mean(start, "itm_loss") < 0.73  # chance: ln 2
    assert mean(end, "itm_loss") < 0.6  # it matches images and captions
    assert mean(end, "itm_acc") > 0.65
    validation = eval_lines(tmp_path / "tiny")  # held-out images and captions
    assert list(validation) == list(range(500, 3001, 500))
    assert validation[3000]["itm_loss"] < 0.6 and validation[3000]["itm_acc"] > 0.65
    assert validation[3000]["mlm_acc"] > 0.6


def test_bf16_zero2_channels_last_trains(tmp_path, synthetic_dir):
    # bf16, ZeRO-2 and channels-last as configs/r50.json and x152.json ship them; validation
    # feeds the bf16 model bf16 inputs.
    records = run_train(tmp_path / "bf16", synthetic_dir, SMALL + [
        "train.max_steps=3", 'deepspeed.bf16={"enabled": true}', "deepspeed.zero_optimization.stage=2",
        "model.channels_last=true", "data.num_workers=0", "deepspeed.train_micro_batch_size_per_gpu=4",
        "train.eval_every=3", "train.eval_records=8"])
    assert [r["step"] for r in records] == [1, 2, 3]
    # finite and sane (a micro-batch of four pairs may hold negatives only: ITM loss alone, < 1)
    assert all(r["loss"] == r["loss"] and 0.1 < r["loss"] < 20.0 for r in records)
    validation = eval_lines(tmp_path / "bf16")[3]
    assert 1.0 < validation["mlm_loss"] < 20.0 and 0.0 <= validation["itm_acc"] <= 1.0


def test_deepspeed_monitors_get_the_logged_metrics_and_resume_without_repeats(tmp_path, synthetic_dir):
    """A `deepspeed` section that enables a monitor (TensorBoard, W&B, Comet, CSV) receives every
    number of metrics.jsonl and eval.jsonl, as Train/<key> and Eval/<key> at the step. After a
    resume, the CSV and TensorBoard files hold each step once, as an uninterrupted run's do:
    the steps logged past the checkpoint (and DeepSpeed's own events past its sample count) are
    cut, and the CSV header is not repeated."""
    from tests.test_monitors import tensorboard_scalars

    def monitors(run: Path) -> list[str]:
        folder = run / "monitor"
        return [f'deepspeed.csv_monitor={{"enabled": true, "output_path": "{folder}", "job_name": "job"}}',
                f'deepspeed.tensorboard={{"enabled": true, "output_path": "{folder}", "job_name": "tb"}}']

    def column(run: Path, name: str) -> list[tuple[int, float]]:
        rows = (run / "monitor" / "job" / f"{name}.csv").read_text().splitlines()
        assert rows[0].startswith("step,") and rows.count(rows[0]) == 1, rows  # one header
        return [(int(step), float(value)) for step, value in (row.split(",") for row in rows[1:])]

    common = SMALL + ["train.max_steps=4", "train.save_every=2", "data.num_workers=0",
                      "deepspeed.train_micro_batch_size_per_gpu=4", "train.eval_every=2", "train.eval_records=8"]
    straight = tmp_path / "straight"
    records = run_train(straight, synthetic_dir, common + monitors(straight))
    for key in ("loss", "mlm_loss", "itm_acc", "lr", "samples_per_s", "grad_norm"):
        assert column(straight, f"Train_{key}") == [(r["step"], pytest.approx(r[key])) for r in records], key
    validation = eval_lines(straight)
    for key in ("mlm_loss", "itm_acc"):
        assert column(straight, f"Eval_{key}") == [(s, pytest.approx(validation[s][key])) for s in (2, 4)], key
    assert [s for s, _ in column(straight, "Train_Samples_lr")] == [4, 8, 12, 16]  # DeepSpeed's own, by samples

    # Interrupted after logging step 3 (and validating there) but before its checkpoint completed.
    interrupted = tmp_path / "interrupted"
    run_train(interrupted, synthetic_dir, common + monitors(interrupted) + ["train.stop_at_step=3"])
    shutil.rmtree(interrupted / "checkpoints" / "step_3")
    (interrupted / "checkpoints" / "latest").write_text("step_2")
    run_train(interrupted, synthetic_dir, common + monitors(interrupted) + ["train.resume=true"])
    for name in ("Train_loss", "Train_mlm_loss", "Train_itm_acc", "Train_lr", "Eval_mlm_loss", "Train_Samples_lr"):
        assert column(interrupted, name) == [(s, pytest.approx(v, rel=1e-6, abs=1e-7))
                                             for s, v in column(straight, name)], name
    straight_tb, resumed_tb = (tensorboard_scalars(run / "monitor" / "tb") for run in (straight, interrupted))
    assert set(resumed_tb) == set(straight_tb) and "Train/Samples/lr" in resumed_tb
    for tag in straight_tb:
        assert [s for s, _ in resumed_tb[tag]] == [s for s, _ in straight_tb[tag]], tag
    assert [v for _, v in resumed_tb["Train/loss"]] == [pytest.approx(v, rel=1e-6) for _, v in straight_tb["Train/loss"]]


def test_profile_steps_write_a_trace_and_a_table(tmp_path, synthetic_dir):
    """train.profile_steps=[2, 3]: a Chrome/Perfetto trace of those steps (the forward, backward
    and optimiser ops, step 1's warm-up left out) and the ops table."""
    import gzip
    run = tmp_path / "run"
    run_train(run, synthetic_dir, SMALL + ["train.max_steps=3", "data.num_workers=0", "train.profile_steps=[2, 3]",
                                           "deepspeed.train_micro_batch_size_per_gpu=4"])
    trace = json.loads(gzip.decompress((run / "profile_rank0.json.gz").read_bytes()))
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert {"aten::addmm", "aten::convolution_backward"} <= names  # encoder forward, CNN backward
    assert any(name.startswith("Optimizer.step") or "fused" in name or "foreach" in name for name in names)
    table = (run / "profile_rank0.txt").read_text()
    assert table.startswith("steps 2-3, sorted by self_cpu_time_total") and "Self CPU" in table


def test_missing_or_malformed_data_names_the_path(tmp_path, synthetic_dir):
    missing = tmp_path / "nowhere" / "captions_train2014.json"
    source = json.dumps([{"format": "coco_captions", "annotations": str(missing), "images": str(tmp_path)}])
    result = launch(tmp_path / "run", synthetic_dir, [f"data.train={source}", "train.eval_every=0"])
    assert result.returncode == 2
    assert str(missing) in result.stderr and "data.train=[]" in result.stderr
    assert "Traceback" not in result.stderr
    # A file that is there but not in its format: its message (file, entry, key), exit 2.
    wrong = tmp_path / "captions.json"
    wrong.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}], "annotations": [{"image_id": 1}]}))
    source = json.dumps([{"format": "coco_captions", "annotations": str(wrong), "images": str(tmp_path)}])
    result = launch(tmp_path / "run", synthetic_dir, [f"data.train={source}", "train.eval_every=0"])
    assert result.returncode == 2
    assert f"error: {wrong}: annotations[0] has no 'caption'" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_backbone_weights_name_the_path_and_the_tool(tmp_path, synthetic_dir):
    missing = tmp_path / "runs" / "tiny-cnn.pth"  # configs/tiny.json's CNN, not made yet
    result = launch(tmp_path / "run", synthetic_dir, [f"model.backbone_weights={missing}"])
    assert result.returncode == 2
    assert str(missing) in result.stderr and "pixelbert.tools.pretrain_backbone" in result.stderr
    assert "Traceback" not in result.stderr
    # Weights of another shape (another backbone): a config error naming the tensor, exit 2.
    other = tmp_path / "other-cnn.pth"
    torch.save({"conv1.weight": torch.zeros(1, 3, 3, 3)}, other)
    result = launch(tmp_path / "run", synthetic_dir, [f"model.backbone_weights={other}"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"config error: {other}: shapes do not fit backbone 'tiny'" in result.stderr
    assert "conv1.weight (1, 3, 3, 3)" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("task", ["pretrain", "vqa", "nlvr2", "retrieval"])
def test_dali_decoding_trains_like_pil(tmp_path, synthetic_dir, task):
    """data.decoder=dali (the CPU pipeline here) in a real run of every task, its validation
    included: the images differ from PIL's by a level or two after resizing (tests/test_dali.py),
    so the losses nearly agree, and validation evaluates the same records."""
    pytest.importorskip("nvidia.dali")
    common = SMALL + NO_DROPOUT + ["train.max_steps=3", "data.num_workers=1", f"train.task={task}",
                                   "deepspeed.train_micro_batch_size_per_gpu=4", "train.eval_every=3",
                                   "train.eval_records=12"]
    pil = run_train(tmp_path / "pil", synthetic_dir, common + ["data.decoder=pil"])
    result = launch(tmp_path / "dali", synthetic_dir, common + ["data.decoder=dali"])
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stderr + result.stdout
    assert "images decoded by DALI (cpu)" in output and "val records, images decoded by DALI (cpu)" in output
    dali = [json.loads(line) for line in (tmp_path / "dali" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in dali] == [1, 2, 3]
    assert losses(dali) == pytest.approx(losses(pil), rel=2e-2)
    assert losses(dali) != losses(pil)  # a different decoder really ran
    pil_eval, dali_eval = eval_lines(tmp_path / "pil")[3], eval_lines(tmp_path / "dali")[3]
    assert pil_eval.keys() == dali_eval.keys() and pil_eval["skipped"] == dali_eval["skipped"] == {}
    counted = {"pretrain": ("images",), "vqa": ("questions", "fallback_answers"), "nlvr2": ("statements",),
               "retrieval": ("images", "texts")}[task]
    assert [pil_eval[k] for k in counted] == [dali_eval[k] for k in counted]
    if task == "pretrain":
        assert losses([dali_eval], "mlm_loss") == pytest.approx(losses([pil_eval], "mlm_loss"), rel=2e-2)
        assert losses([dali_eval], "itm_loss") == pytest.approx(losses([pil_eval], "itm_loss"), rel=2e-2)


@pytest.mark.parametrize("task, keys", [
    ("pretrain", ("mlm_loss", "itm_loss", "mlm_acc", "itm_acc", "images")),
    ("vqa", ("overall", "per_question_type", "questions", "majority_answer_baseline"))])
def test_validation_during_training_is_the_evaluate_cli_and_changes_nothing(tmp_path, synthetic_dir, task, keys):
    """train.eval_every runs pixelbert.evaluate's evaluation: the report at the last step is the
    CLI's on the final checkpoint, and training with it is the same as without."""
    common = SMALL + NO_DROPOUT + [f"train.task={task}", "task.min_answer_count=1", "train.max_steps=4",
                                   "data.num_workers=1", "deepspeed.train_micro_batch_size_per_gpu=4"]
    plain = run_train(tmp_path / "plain", synthetic_dir, common)
    run = tmp_path / "validated"
    validated = run_train(run, synthetic_dir, common + ["train.eval_every=3"])
    assert losses(validated) == losses(plain)
    reports = eval_lines(run)
    assert list(reports) == [3, 4]  # every 3 steps, and at the end
    if task == "vqa":
        assert (run / "vqa_val_step3_results.json").is_file()
    result = run_python(["-m", "pixelbert.evaluate", "--config", str(run / "config.json"), "--checkpoint", str(run)],
                        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cli = json.loads((run / f"eval_{task}_val.json").read_text())
    for key in keys:
        assert reports[4][key] == pytest.approx(cli[key]), key


def broken_coco_source(tmp_path: Path, synthetic: Path) -> tuple[str, dict[str, str]]:
    """A COCO captions source: the synthetic training images plus, as a crawl would have them,
    a missing, a truncated and a random-bytes image and two empty captions."""
    from tests.bad_files import write_bad
    import numpy as np
    captions = json.loads((synthetic / "annotations" / "captions_train.json").read_text())
    bad = write_bad(tmp_path / "bad", np.random.default_rng(0))
    images, annotations = captions["images"], captions["annotations"]
    next_id = max(img["id"] for img in images) + 1
    for k, name in enumerate(("missing", "truncated", "random_bytes")):
        path = bad[name][0]
        images.append({"id": next_id + k, "file_name": str(path.resolve()), "height": 100, "width": 100})
        annotations.append({"id": 10**6 + k, "image_id": next_id + k, "caption": "a red circle"})
    annotations[0]["caption"], annotations[1]["caption"] = "", "   "
    path = tmp_path / "captions_broken.json"
    path.write_text(json.dumps(captions))
    source = json.dumps([{"format": "coco_captions", "annotations": str(path),
                          "images": str(synthetic / "images")}])
    return source, {name: bad[name][1] for name in ("missing", "truncated", "random_bytes")}


def test_bad_records_are_skipped_counted_and_logged(tmp_path, synthetic_dir):
    launch(tmp_path / "make_set", synthetic_dir, SMALL + ["train.max_steps=1", "data.num_workers=0"])
    source, reasons = broken_coco_source(tmp_path, synthetic_dir)
    common = SMALL + ["train.max_steps=12", "data.num_workers=1", "deepspeed.train_micro_batch_size_per_gpu=8",
                      "data.captions_per_image=1",
                      f"data.train={source}", "train.eval_every=0", "data.aspect_grouping_window=1",
                      "train.log_every=12"]
    result = launch(tmp_path / "run", synthetic_dir, common + ["data.max_bad_fraction=0.5"])
    assert result.returncode == 0, result.stderr[-3000:]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped"]["empty_text"] == 2  # counted once, when the captions are read
    # 12 steps x 8 images of 99 cover every image at least once: each bad one was met.
    for reason in set(reasons.values()):
        assert last["skipped"].get(reason, 0) >= 1, (reason, last["skipped"])
    assert "bad records skipped: empty_text 2" in result.stderr + result.stdout
    # The same data under a strict limit stops the run, naming examples.
    strict = launch(tmp_path / "strict", synthetic_dir, common + [
        "data.max_bad_fraction=0.001", "data.min_items_before_bad_check=10"])
    assert strict.returncode == 3
    assert "data.max_bad_fraction=0.001" in strict.stderr and "Examples:" in strict.stderr
    assert "Traceback" not in strict.stderr


def test_a_data_set_of_unreadable_images_stops_with_the_reason(tmp_path, synthetic_dir):
    """Every image unreadable: a loader worker meets 16 bad images in a row and stops the run
    (exit 3, the data's code) with that line, not the worker's traceback."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(b"")
    annotations = tmp_path / "captions.json"
    annotations.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(3)],
                                       "annotations": [{"id": i, "image_id": i, "caption": "a red circle"}
                                                       for i in range(3)]}))
    source = json.dumps([{"format": "coco_captions", "annotations": str(annotations), "images": str(images)}])
    result = launch(tmp_path / "run", synthetic_dir, [f"data.train={source}", "data.num_workers=1",
                                                      "train.max_steps=2", "train.warmup_steps=1", "data.decoder=pil"])
    assert result.returncode == 3, result.stderr[-3000:]
    assert re.search(r"^error: 16 bad images in a row, the last: empty_file: .*\.jpg", result.stderr, re.M)
    assert "Traceback" not in result.stderr


def test_a_diverging_run_stops_before_the_bad_step(tmp_path, synthetic_dir):
    """Absurd learning rates: the loss is non-finite at step 2; every rank stops there before
    the optimiser steps on it, with exit code 4 and the reason, and step 1's metrics logged."""
    run = tmp_path / "run"
    result = launch(run, synthetic_dir, SMALL + [
        "train.max_steps=20", "data.num_workers=0", "train.lr=1e30", "train.backbone_lr=1e30",
        "train.backbone_optimizer=adamw", "deepspeed.gradient_clipping=0"])
    assert result.returncode == 4, result.stderr[-3000:]
    assert "error: non-finite loss at step 2; the optimiser did not step" in result.stderr
    assert "Traceback" not in result.stderr
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_config_error_exits_cleanly(tmp_path, synthetic_dir):
    result = launch(tmp_path / "run", synthetic_dir, ["model.hiden_size=8"])
    assert result.returncode == 2
    assert "config error: unknown config key model.hiden_size" in result.stderr


def test_pretrain_then_finetune_vqa_beats_the_majority_answer(tmp_path, synthetic_dir):
    """The whole path at CI size: pre-train, fine-tune VQA from it, evaluate with the official
    metric. Margin from observed runs: ~30-35 % against a majority-answer baseline of ~12-15 %
    (the question types alone carry most of it at this size; see the README's numbers)."""
    syn = synthetic_dir / "vqa_set"
    common = ["data.synthetic_images=300", "data.num_workers=1", "train.log_every=20", "train.save_every=0"]
    run_train(tmp_path / "pre", syn, common + ["train.max_steps=40", "train.warmup_steps=5"])
    records = run_train(tmp_path / "vqa", syn, common + [
        "train.task=vqa", f"task.init_from={tmp_path / 'pre'}", "task.min_answer_count=3",
        "train.max_steps=120", "train.warmup_steps=10", "train.lr=0.0005", "train.backbone_lr=0.0005"])
    assert records[-1]["vqa_loss"] < records[0]["vqa_loss"]
    result = run_python(["-m", "pixelbert.evaluate", "--config", str(tmp_path / "vqa" / "config.json"),
                         "--checkpoint", str(tmp_path / "vqa")], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "vqa" / "eval_vqa_val.json").read_text())
    print(report)
    assert report["questions"] == 120
    assert report["overall"] > report["majority_answer_baseline"] + 8.0
    results = json.loads(Path(report["results_file"]).read_text())
    assert len(results) == 120 and set(results[0]) == {"question_id", "answer"}
