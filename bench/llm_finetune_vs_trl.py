"""Fine-tune speed of llm-finetune against TRL's SFTTrainer (completion-only loss), side by side on CPU.

    python bench/llm_finetune_vs_trl.py                # SmolLM2-135M-Instruct, MASSIVE intent; ~10 min on 1 core
    python bench/llm_finetune_vs_trl.py --steps 20 --batch-size 8 --rounds 2 --threads 2

Needs `pip install trl` (1.16.0 was measured; it installs beside transformers 5.x). `--data-dir`: the folder with
massive_en/ (default $CLFBENCH_DATA, else the samples shipped in the package).

Three trainers fit the same model on the same batches, one after another in this process, their order rotated
every round:

- `llm-finetune`: the method's own training code, called in-process (the worker's torchrun launch left out):
  `training_sequences` renders and encodes the examples exactly as a run does (the prompt method's chat prompt,
  then the answer and the stop token; only those carry labels), `prepare_model`, `start` (AdamW, linear schedule,
  gradient clipping at 1.0) and `train` (the engine's `train_loop`: length-grouped micro-batches, `collate`, one
  forward/backward per micro-batch, the optimizer step), with the default `share_prefix=true`: the prompt text every
  example shares runs once per micro-batch;
- `llm-finetune share_prefix=false`: the same with every row fed whole (what TRL computes);
- `TRL SFTTrainer`: the very token ids and label masks, given as a pre-tokenised dataset (`input_ids` +
  `completion_mask`, `completion_only_loss=True`), fed in llm-finetune's batch order (a sequential sampler), with
  the same batch size, max length, steps, AdamW (`optim=adamw_torch`, the non-fused AdamW llm-finetune uses on CPU),
  lr, schedule (no warm-up, linear decay), weight decay 0 and clipping. TRL's defaults that differ are set to
  llm-finetune's: `bf16=False` (fp32), `gradient_checkpointing=False`. No evaluation, no checkpoints. TRL computes
  its per-step entropy and token accuracy as it always does.

Both use the model loaded the same way (`load_model`: fp32, SDPA attention), reloaded fresh for every trainer and
round (load time not counted), the same torch thread count, and log the loss every step.

Measured: the wall time, and the CPU time of this process, from the end of the first `--warmup` optimizer steps to
the end of the last one (a step ends after its optimizer step), and the tokens of the training sequences those
steps trained on (prompt + answer + stop token of every row; padding not counted). The same numerator for all
three: "sequence tokens/s", per wall second and per CPU second. With the default single torch thread the CPU
seconds are the work a step costs even on a machine that others share (wall time there depends on their load).
llm-finetune's own `train_tokens_per_s` counts a shared prefix once, so it is not used here. The median of the
rounds is reported, with the ratio to TRL. The losses of the first and last step are printed for each: the same
data, labels and weights give the same first-step loss (share_prefix sums in another order: tiny differences).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLM_SHARED, LLM_WHOLE, TRL = "llm-finetune", "llm-finetune share_prefix=false", "TRL SFTTrainer"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a clfbench model alias or a local HF folder")
    parser.add_argument("--task", default="massive-intent")
    parser.add_argument("--data-dir", default=None, help="default: $CLFBENCH_DATA, else the shipped samples")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per trainer and round")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--rounds", type=int, default=1, help="each round runs every trainer once, order rotated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time per step is then robust "
                        "to other jobs on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    return args


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is what a step costs whatever else runs beside it."""
    return time.perf_counter(), time.process_time()


@dataclass
class Measured:
    """One trainer's run: the (wall, CPU) time at the end of every step (index 0: the start), its loss per step."""

    ends: list[tuple[float, float]] = field(default_factory=list)
    losses: dict[int, float] = field(default_factory=dict)


@dataclass
class Setup:
    args: argparse.Namespace
    model_path: str
    tasks: list
    train: list  # llm-finetune's Encoded rows
    order: list[int]  # the row indices in the order llm-finetune trains on them, batch after batch
    prefix: list[int]  # the shared prompt prefix (llm-finetune with share_prefix)


def options(args: argparse.Namespace, share_prefix: bool):
    from clfbench.engine.methods.catalog import LlmFinetuneOptions

    return LlmFinetuneOptions(epochs=1, batch_size=args.batch_size, lr=args.lr, weight_decay=0.0, warmup_ratio=0.0,
                              max_length=args.max_length, share_prefix=share_prefix, eval_every=0,
                              checkpoint_every=0, log_every=1, dev_limit=1)


def context(setup_args: argparse.Namespace, model_path: str, tasks: list, share_prefix: bool, output_dir: Path,
            log_metric=lambda *a: None):
    from clfbench.engine.context import RunContext

    return RunContext(run_id=0, attempt=1, spec=SimpleNamespace(seed=setup_args.seed, shots=setup_args.shots,
                                                                method="llm-finetune"),
                      options=options(setup_args, share_prefix), tasks=tasks, model_path=model_path,
                      output_dir=output_dir, rank=0, world_size=1, local_rank=0, device="cpu",
                      log_metric=log_metric, set_progress=lambda *a: None)


def pieces(model_path: str, tasks: list, shots: int, seed: int):
    """A fresh fp32 model and the prompt machinery around it, as llm-finetune's `run` builds them."""
    import torch

    from clfbench.engine.decoding import Decoder, load_model
    from clfbench.engine.prompting.chat import ChatFormat
    from clfbench.engine.prompting.library import PromptBuilder, load_prompt_set

    prompt = load_prompt_set("paper").select(tasks, shots)
    tokenizer, model = load_model(model_path, "float32", torch.device("cpu"))
    chat = ChatFormat(tokenizer, "template", getattr(model, "generation_config", None))
    builder = PromptBuilder.create(prompt, tasks, shots, seed, None, chat.forbidden)
    return tokenizer, model, chat, builder, Decoder(model, chat, torch.device("cpu")), prompt.describe()


def prepare(args: argparse.Namespace) -> Setup:
    """The training rows (steps x batch size MASSIVE examples, a seeded subset) encoded by llm-finetune, and the
    order its length-grouped batcher trains them in."""
    from clfbench.engine.methods import llm_finetune as lf
    from clfbench.engine.models import resolve_model
    from clfbench.engine.tasks import get_task, load_task
    from clfbench.engine.tasks.definitions import resolve_data_dir, sample_data_dir
    from clfbench.engine.training import epoch_batcher, length_grouped_epochs, plan_steps

    model_path = resolve_model(args.model)
    data_dir = resolve_data_dir(args.data_dir) or sample_data_dir()
    tasks = [load_task(get_task(name), data_dir=data_dir, train_limit=args.steps * args.batch_size, test_limit=1,
                       seed=args.seed) for name in args.task.split("+")]
    _tokenizer, _model, chat, builder, decoder, description = pieces(model_path, tasks, args.shots, args.seed)
    with tempfile.TemporaryDirectory() as out:
        ctx = context(args, model_path, tasks, True, Path(out))
        data = lf.training_sequences(ctx, decoder, builder, description)
    plan = plan_steps(len(data.train), args.batch_size, 1, 1.0, 0.0)
    if plan.total_steps != args.steps:
        raise SystemExit(f"the task has {len(data.train)} training rows, fewer than {args.steps} steps need")
    batches = epoch_batcher(length_grouped_epochs([len(s.ids) for s in data.train], args.batch_size, 1, 0,
                                                  f"{lf.SHUFFLE_KEY}:{args.seed}", lf.SORT_WINDOW),
                            plan.steps_per_epoch)
    order = [i for step in range(args.steps) for batch in batches(step) for i in batch]
    return Setup(args, model_path, tasks, data.train, order, data.prefix)


def run_llm_finetune(setup: Setup, share_prefix: bool) -> Measured:
    """llm-finetune's own training loop, in-process, on a fresh model."""
    from clfbench.engine.methods import llm_finetune as lf
    from clfbench.engine.training import plan_steps

    args, measured = setup.args, Measured()

    def log_metric(step: int, name: str, value: float) -> None:
        if name == "train_loss":  # the first metric of a step's logged point, right after its optimizer step
            measured.ends.append(clock())
            measured.losses[step] = value

    _tokenizer, model, _chat, _builder, decoder, _ = pieces(setup.model_path, setup.tasks, args.shots, args.seed)
    with tempfile.TemporaryDirectory() as out:
        ctx = context(args, setup.model_path, setup.tasks, share_prefix, Path(out), log_metric)
        data = lf.Sequences(train=setup.train, dev=[], prefix=setup.prefix if share_prefix else [])
        plan = plan_steps(len(data.train), args.batch_size, 1, 1.0, 0.0)
        loss_model = lf.prepare_model(model, decoder, ctx.options)
        training = lf.start(ctx, loss_model, plan, {"bench": "llm_finetune_vs_trl"})
        with contextlib.redirect_stdout(io.StringIO()):  # its per-step log lines
            measured.ends.append(clock())
            lf.train(ctx, training, model, plan, data, decoder.pad_id)
    return measured


def run_trl(setup: Setup) -> Measured:
    """TRL's SFTTrainer on the same token ids, label masks and batch order, on a fresh model."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    args, measured = setup.args, Measured()
    rows = [setup.train[i] for i in setup.order]
    dataset = Dataset.from_dict({"input_ids": [r.ids for r in rows],
                                 "completion_mask": [[0] * r.n_prompt + [1] * r.n_labels for r in rows]})

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):  # llm-finetune's batches, in its order
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            measured.ends.append(clock())

        def on_step_end(self, *a, **k):
            measured.ends.append(clock())

        def on_log(self, _args, state, _control, logs=None, **k):
            if logs and "loss" in logs:
                measured.losses[state.global_step] = float(logs["loss"])

    tokenizer, model, *_ = pieces(setup.model_path, setup.tasks, args.shots, args.seed)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=args.lr, weight_decay=0.0, warmup_steps=0,
            lr_scheduler_type="linear", optim="adamw_torch", max_grad_norm=1.0, bf16=False, fp16=False,
            gradient_checkpointing=False, completion_only_loss=True, max_length=args.max_length, packing=False,
            padding_free=False, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
            use_cpu=True, dataloader_num_workers=0, seed=args.seed, disable_tqdm=True)
        trainer = InOrder(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[Clock()])
        trainer.train()
    return measured


def sequence_tokens(setup: Setup, first_step: int) -> int:
    """Tokens of the training sequences of steps first_step+1 .. steps (prompt + answer + stop, no padding)."""
    rows = setup.order[first_step * setup.args.batch_size:]
    return sum(len(setup.train[i].ids) for i in rows)


def report(setup: Setup, results: dict[str, list[Measured]], threads: int) -> None:
    args = setup.args
    timed = args.steps - args.warmup
    tokens = sequence_tokens(setup, args.warmup)
    lengths = [len(s.ids) for s in setup.train]
    print(f"\n{args.task}, {args.shots} shots, {len(setup.train)} rows: {statistics.mean(lengths):.0f} tokens per "
          f"sequence ({min(lengths)}-{max(lengths)}), {statistics.mean(s.n_labels for s in setup.train):.1f} "
          f"labelled; shared prefix {len(setup.prefix)} tokens; batch {args.batch_size}, {args.steps} steps "
          f"({args.warmup} untimed), {threads} torch threads, fp32, {args.rounds} rounds")
    print(f"timed: steps {args.warmup + 1}-{args.steps}, {tokens:,} sequence tokens\n")
    def rate(m: Measured, kind: int) -> float:
        return tokens / (m.ends[-1][kind] - m.ends[args.warmup][kind])

    wall = {name: [rate(m, 0) for m in runs] for name, runs in results.items()}
    cpu = {name: [rate(m, 1) for m in runs] for name, runs in results.items()}
    trl_wall, trl_cpu = statistics.median(wall[TRL]), statistics.median(cpu[TRL])
    print(f"{'trainer':32} {'tokens/s':>8} {'s/step':>7} {'vs TRL':>6} | {'tokens/CPU-s':>12} {'CPU-s/step':>10} "
          f"{'vs TRL':>6} | {'loss step 1':>11} {'step ' + str(args.steps):>8}")
    for name, runs in results.items():
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        first, last = runs[0].losses.get(1, float("nan")), runs[0].losses.get(args.steps, float("nan"))
        print(f"{name:32} {w:8.1f} {tokens / w / timed:7.1f} {w / trl_wall:5.2f}x | {c:12.1f} "
              f"{tokens / c / timed:10.1f} {c / trl_cpu:5.2f}x | {first:11.4f} {last:8.4f}")
    for name in results:
        print(f"  {name}: wall tokens/s per round {' '.join(f'{r:.1f}' for r in wall[name])}; "
              f"per CPU-s {' '.join(f'{r:.1f}' for r in cpu[name])}")

def main() -> int:
    args = parse_args()
    import torch

    try:
        import trl
    except ImportError:
        raise SystemExit("llm_finetune_vs_trl: needs TRL (pip install trl)") from None
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    setup = prepare(args)
    print(f"torch {torch.__version__}, trl {trl.__version__}; {len(setup.train)} rows encoded in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    trainers = {LLM_SHARED: lambda: run_llm_finetune(setup, True), LLM_WHOLE: lambda: run_llm_finetune(setup, False),
                TRL: lambda: run_trl(setup)}
    results: dict[str, list[Measured]] = {name: [] for name in trainers}
    names = list(trainers)
    for round_index in range(args.rounds):
        for name in names[round_index % 3:] + names[:round_index % 3]:
            torch.manual_seed(args.seed)
            torch.set_num_threads(threads)
            began = time.perf_counter()
            results[name].append(trainers[name]())
            print(f"round {round_index + 1}: {name}: {time.perf_counter() - began:.0f} s", flush=True)
    report(setup, results, threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
