"""The decoding library: what every method that answers with a causal LM uses (`prompt`, `llm-finetune`).

- `model`: loading a causal LM, and the dtype `auto` stands for;
- `decoder`: the model with the run's shared prompt prefix computed once, batched forward passes with explicit
  masks and positions, the first pass of a batch (`feed_chains`) and its batches (`prefix_batches`);
  `shared_prefix`: the attention that holds that prefix once for a whole batch;
- `greedy`: greedy decoding, free or constrained to the answer's grammar;
- `scoring`: exact label scoring (a branch and bound over the answers' prefix tree);
- `answer`: what a decision mode returns per example (`Answer`), and the progress it logs;
- `decide`: one entry point over the three decision modes, returning one prediction per example and task.

Prompt text (templates, chat formats, answer shapes, parsing) is `engine.prompting`'s: torch-free, shared with
the `openai` method. Methods import this library; they never import each other.
"""
from clfbench.engine.decoding.decide import DecisionSettings, decide
from clfbench.engine.decoding.decoder import SENTINEL, Decoder
from clfbench.engine.decoding.model import load_model, resolve_dtype

__all__ = ["SENTINEL", "DecisionSettings", "Decoder", "decide", "load_model", "resolve_dtype"]
