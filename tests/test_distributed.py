"""Data-parallel training: 2 gloo processes on CPU give the single-process prompt."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softprompt.models.tiny import SENTENCES, tiny_llama, tiny_tokenizer
from softprompt.training import TrainOptions, train
from softprompt.training.distill import PROBABILITIES_KEY, TEACHER_FILE
from softprompt.training.distributed import DistContext, check_batch_divisible

TRAIN_ARGS = {  # a constant rate: a run resumed from 3 to 6 steps then equals a 6-step run
    "schedule": "constant",
    "template": "{text} answer",
    "verbalizer": '{"positive": " positive", "negative": " negative"}',
    "init": "RANDOM",
    "steps": 6,
    "batch_size": 4,
    "eval_every": 3,
    "max_eval_examples": 8,
    "lr": 0.05,
    "warmup_steps": 0,
    "baselines": False,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    model_dir = root / "model"
    tiny_llama(seed=3).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    words = " ".join(SENTENCES).split()
    generator = random.Random(0)
    rows = []
    for _ in range(80):
        text = " ".join(generator.choice(words) for _ in range(generator.randint(3, 9)))
        rows.append({"text": text, "label": "positive" if "good" in text or "great" in text else "negative"})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model_dir, data


def _cli_args(options: dict) -> list[str]:
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


def _prompt(run_dir: Path) -> torch.Tensor:
    return load_file(str(run_dir / "prompt" / "adapter_model.safetensors"))["prompt_embeddings"]


def _launch(nproc: int, target: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``target`` (a script and its arguments, or ``-m module ...``) in ``nproc`` processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--standalone", *target]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def _torchrun(nproc: int, options: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return _launch(nproc, ["-m", "softprompt", "train", *_cli_args(options)], timeout)


def test_shard_splits_every_item_once() -> None:
    items = list(range(7))
    shards = [DistContext(rank, 3).shard(items) for rank in range(3)]
    assert shards == [[0, 1, 2], [3, 4], [5, 6]]


def test_world_size_must_divide_global_batch() -> None:
    with pytest.raises(ValueError, match="batch_size=6 .* not divisible by the world size 4"):
        check_batch_divisible(6, DistContext(0, 4))


@pytest.fixture(scope="module")
def single_run(setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process reference run every multi-process run must reproduce."""
    model_dir, data = setup
    output = tmp_path_factory.mktemp("single")
    train(TrainOptions(model=str(model_dir), dataset=str(data), **TRAIN_ARGS, output_dir=str(output)))
    return output


def test_two_processes_match_one(setup: tuple[Path, Path], single_run: Path, tmp_path: Path) -> None:
    model_dir, data = setup
    options = {"model": str(model_dir), "dataset": str(data), **TRAIN_ARGS}
    result = _torchrun(2, {**options, "output_dir": str(tmp_path / "double")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.allclose(_prompt(single_run), _prompt(tmp_path / "double"), atol=1e-6)
    report = json.loads((tmp_path / "double" / "report.json").read_text())
    single = json.loads((single_run / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["best_validation_accuracy"] == single["best_validation_accuracy"]
    assert not torch.equal(_prompt(single_run), torch.zeros_like(_prompt(single_run)))
    # Rank 0 alone wrote: one metrics line per logged step, not two.
    steps = [json.loads(line)["step"] for line in (tmp_path / "double" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len(set((step, i) for i, step in enumerate(steps)))
    assert steps.count(3) == 1


def test_sharded_frozen_base_matches_one(setup: tuple[Path, Path], single_run: Path, tmp_path: Path) -> None:
    model_dir, data = setup
    options = {"model": str(model_dir), "dataset": str(data), **TRAIN_ARGS, "shard_base": True}
    result = _torchrun(2, {**options, "output_dir": str(tmp_path / "sharded")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded 2 frozen decoder blocks over 2 ranks" in result.stderr
    assert torch.allclose(_prompt(single_run), _prompt(tmp_path / "sharded"), atol=1e-5)


def test_teachers_are_scored_in_shares(setup: tuple[Path, Path], single_run: Path, tmp_path: Path) -> None:
    model_dir, data = setup
    options = {"model": str(model_dir), "dataset": str(data), **TRAIN_ARGS,
               "teacher": str(single_run / "prompt")}
    train(TrainOptions(**{**options, "teacher": [options["teacher"]]}, output_dir=str(tmp_path / "one")))
    result = _torchrun(2, {**options, "output_dir": str(tmp_path / "two")})
    assert result.returncode == 0, result.stderr[-3000:]
    train_examples = json.loads((tmp_path / "one" / "report.json").read_text())["train_examples"]
    assert f"rank 0 scored {(train_examples + 1) // 2} of the {train_examples} train examples (2 ranks)" in result.stderr
    # Gathered in order, the two shares are the one-process table, and so is the student.
    one, two = (load_file(str(tmp_path / run / TEACHER_FILE))[PROBABILITIES_KEY] for run in ("one", "two"))
    torch.testing.assert_close(two, one, rtol=0, atol=1e-6)
    assert torch.allclose(_prompt(tmp_path / "one"), _prompt(tmp_path / "two"), atol=1e-6)


SHARDED_BLOCKS_SCRIPT = """
import sys

import torch
from torch.distributed.tensor import DTensor
from softprompt.fastpath.frozen import FrozenModel
from softprompt.models.tiny import tiny_llama, tiny_tokenizer
from softprompt.training import distributed

context = distributed.init_distributed(torch.device("cpu"), 60)
model = tiny_llama(seed=3).requires_grad_(False)
distributed.shard_frozen_base(model, context)
frozen = FrozenModel(model, tiny_tokenizer())
ids = torch.tensor([[5, 6, 7, 8]])
with torch.no_grad():
    frozen.hidden_states(frozen.embed(ids), None, torch.arange(4)[None])
blocks = distributed.decoder_layers(model)
sharded = all(isinstance(weight, DTensor) for weight in blocks.parameters())
whole = not isinstance(model.get_input_embeddings().weight, DTensor)
# One write per rank (atomic on a pipe), so the two ranks' lines do not interleave.
sys.stdout.write(f"rank {context.rank}: sharded after a forward {sharded}, embeddings whole {whole}\\n")
sys.stdout.flush()
distributed.shutdown(context)
"""


def test_sharded_blocks_are_gathered_only_while_they_run(tmp_path: Path) -> None:
    script = tmp_path / "forward.py"
    script.write_text(SHARDED_BLOCKS_SCRIPT)
    result = _launch(2, [str(script)], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: sharded after a forward True, embeddings whole True" in result.stdout


def test_sharded_base_evaluates_splits_of_any_size(setup: tuple[Path, Path], tmp_path: Path) -> None:
    # 33 validation and test examples: shares of 17 and 16 would give the ranks 2 and 1 batches
    # of 16, and the blocks' weight gathering would stall. Every rank runs the whole split.
    model_dir, _ = setup
    words = " ".join(SENTENCES).split()
    generator = random.Random(1)
    rows = [" ".join(generator.choice(words) for _ in range(generator.randint(3, 9))) for _ in range(400)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(
        json.dumps({"text": text, "label": "positive" if "good" in text else "negative"}) + "\n"
        for text in rows
    ))
    options = {"model": str(model_dir), "dataset": str(data), **TRAIN_ARGS, "steps": 2, "eval_every": 2,
               "max_eval_examples": 33, "max_validation_examples": 33}
    train(TrainOptions(**options, output_dir=str(tmp_path / "one")))
    result = _torchrun(2, {**options, "shard_base": True, "output_dir": str(tmp_path / "two")}, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / run / "report.json").read_text()) for run in ("one", "two"))
    assert two["test_examples"] == 33
    for metric in ("test_accuracy", "best_validation_accuracy", "zero_shot_accuracy"):
        assert two.get(metric) == one.get(metric), metric
    assert torch.allclose(_prompt(tmp_path / "one"), _prompt(tmp_path / "two"), atol=1e-5)


UNEVEN_CLOCKS_SCRIPT = """
import itertools
import json
import sys

import softprompt.training.loop
from softprompt.training import TrainOptions, train
from softprompt.training.distributed import world_from_environment

# A fake clock read at each step's start and end: rank 0's steps take 5 s, rank 1's 10 s.
clock = itertools.count(0, 5 if world_from_environment().rank == 0 else 10)
softprompt.training.loop._step_clock = lambda: float(next(clock))
train(TrainOptions(**json.loads(sys.argv[1])))
"""


def test_ranks_stop_together_at_the_end_of_a_time_budget(setup: tuple[Path, Path], tmp_path: Path) -> None:
    # Alone, rank 0 would spend a 12 s budget after 3 steps and rank 1 after 2; counting the
    # ranks' mean step time (7.5 s), both stop after step 2.
    model_dir, data = setup
    script = tmp_path / "uneven.py"
    script.write_text(UNEVEN_CLOCKS_SCRIPT)
    options = {"model": str(model_dir), "dataset": str(data), **TRAIN_ARGS, "steps": 12, "time_budget": 12,
               "dist_timeout": 30, "output_dir": str(tmp_path / "run")}
    result = _launch(2, [str(script), json.dumps(options)], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == 2


def test_shard_base_needs_several_processes(setup: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, data = setup
    with pytest.raises(ValueError, match="shard_base needs several processes"):
        train(model=str(model_dir), dataset=str(data), **TRAIN_ARGS, shard_base=True, output_dir=str(tmp_path))


def test_resume_with_another_world_size(setup: tuple[Path, Path], single_run: Path, tmp_path: Path) -> None:
    model_dir, data = setup
    options = {"model": str(model_dir), "dataset": str(data), **TRAIN_ARGS}
    first = _torchrun(2, {**options, "steps": 3, "output_dir": str(tmp_path / "split")})
    assert first.returncode == 0, first.stderr[-3000:]
    # Continue the 2-process run in one process, to 6 steps.
    saved = json.loads((tmp_path / "split" / "options.json").read_text())
    saved["steps"] = 6
    (tmp_path / "split" / "options.json").write_text(json.dumps(saved))
    train(resume=str(tmp_path / "split"))
    whole_state = load_file(str(single_run / "state" / "prompt.safetensors"))["prompt"]
    split_state = load_file(str(tmp_path / "split" / "state" / "prompt.safetensors"))["prompt"]
    assert torch.allclose(whole_state, split_state, atol=1e-6)


def test_bad_world_size_fails_before_loading(setup: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, data = setup
    options = {"model": str(model_dir), "dataset": str(data), **TRAIN_ARGS, "batch_size": 3}
    result = _torchrun(2, {**options, "output_dir": str(tmp_path / "bad")}, timeout=120)
    assert result.returncode != 0
    assert "not divisible by the world size 2" in result.stderr
