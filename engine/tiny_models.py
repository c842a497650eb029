"""Tiny random models for fast tests and smoke runs.

`build_tiny_encoder(folder)` writes a 2-layer BERT (hidden 32) with a WordPiece tokenizer (a `BertTokenizerFast`);
`build_tiny_llama(folder)` writes a 2-layer Llama (hidden 32) with a byte-level BPE tokenizer and a
ChatML chat template like SmolLM2's. The tokenizers are trained on the fly (with `tokenizers`) on the
small built-in corpus below, so tokenization of ordinary English text is sensible. Both folders load
through the same `AutoTokenizer / AutoModel*.from_pretrained(folder)` path the product uses, and
both builds are deterministic for a given seed (same files, same weights) and take about a second.

The weights are random: these models can learn a task in a unit test but know nothing.
Normally reached through `engine.models.resolve_model("tiny-bert" | "tiny-llama")`, which builds
them into the model cache once.
"""
from __future__ import annotations

import string
from pathlib import Path

# A small corpus in the style of the benchmarks' data: MASSIVE-like assistant commands and
# 20 Newsgroups-like posts, plus words the tests use. Only used to train the tokenizers.
CORPUS: tuple[str, ...] = (
    # MASSIVE-style commands (alarm, weather, music, calendar, email, iot, transport, cooking, news, qa)
    "wake me up at seven am tomorrow morning",
    "set an alarm for six thirty on weekdays",
    "cancel my alarm for tomorrow",
    "what alarms do i have set for this week",
    "what is the weather like in boston today",
    "will it rain this weekend in new york",
    "do i need an umbrella tomorrow",
    "how hot will it be on friday afternoon",
    "play some jazz music from the nineties",
    "play the latest song by taylor swift",
    "skip this song and turn up the volume",
    "put on my favorite playlist please",
    "add a meeting with john to my calendar on monday at ten",
    "remind me to call my mother tonight",
    "what is on my schedule for next tuesday",
    "delete the dentist appointment from my calendar",
    "send an email to my boss saying i will be late",
    "check my inbox for new emails from sarah",
    "reply to the last email and say thanks",
    "turn off the lights in the kitchen",
    "dim the bedroom lights to fifty percent",
    "make the living room lights blue",
    "start the vacuum cleaner and open the curtains",
    "turn the coffee machine on",
    "book a taxi to the airport for eight pm",
    "when is the next train to london",
    "how long will it take to drive to work with traffic",
    "order me an uber to the train station",
    "how do i make pancakes without eggs",
    "give me a recipe for chicken curry",
    "how many minutes should i boil an egg",
    "what are the latest news headlines",
    "tell me the top stories in sports today",
    "what happened in the stock market this morning",
    "who is the president of france",
    "how tall is the eiffel tower",
    "what is the capital of australia",
    "tell me a joke",
    "what time is it in tokyo right now",
    "convert fifty dollars to euros",
    "how are you doing today olly",
    "order a large pizza with extra cheese for delivery",
    "set the thermostat to twenty one degrees",
    "read me my last text message",
    "what is the definition of serendipity",
    # 20 Newsgroups-style posts (space, sport, computers, science, politics, religion, vehicles, forsale)
    "the space shuttle launched from kennedy space center and nasa confirmed the orbit",
    "the satellite telescope sent images of a distant galaxy and the moon",
    "our hockey team won the playoff game in overtime with a great goal",
    "the pitcher threw a no hitter and the baseball season ends next month",
    "i am looking for a graphics card driver for windows that supports opengl",
    "my hard drive and scsi controller stopped working after the upgrade",
    "does anyone know how to configure the x window server on a unix workstation",
    "the mac monitor flickers when the computer boots from the floppy disk",
    "the doctor said the patient needs medicine for the infection and more tests",
    "research on diet and cancer was published in a medical journal",
    "the encryption chip proposal raises privacy concerns about the government keys",
    "the clipper chip and public key cryptography were debated on the list",
    "the circuit needs a resistor and a capacitor to filter the power supply",
    "the senate passed a bill on gun control and the second amendment",
    "israel and the middle east peace talks continued in washington",
    "the argument about god and the bible and faith continues in this group",
    "christian churches and atheism were discussed by several posters",
    "my motorcycle needs new tires and the dealer quoted a high price",
    "the new car has a v6 engine and better mileage than the old model",
    "for sale a used printer and a monitor in good condition best offer",
    "thanks in advance for any help, please reply by email",
    "in article someone wrote that the claim is wrong, i disagree",
    # Words the tests rely on
    "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega",
    "the quick brown fox jumps over the lazy dog",
    "pack my box with five dozen liquor jugs",
    "one two three four five six seven eight nine ten hundred thousand",
    "monday tuesday wednesday thursday friday saturday sunday",
    "january february march april may june july august september october november december",
    "yes no maybe ok okay positive negative neutral good bad great terrible happy sad angry",
    "person location organization date money percent city country company",
)

# Every character on its own and inside a word, so no plain ASCII text becomes an unknown token.
_ALNUM = string.ascii_lowercase + string.digits
_COVERAGE: tuple[str, ...] = (
    " ".join(_ALNUM),
    " ".join("x" + _ALNUM[i:] for i in range(len(_ALNUM))),
    " ".join(string.punctuation),
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The size both tiny models share: 2 layers of width 32, so a test's forward pass costs next to nothing.
_TINY_SIZE = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64)
ENCODER_CONFIG = dict(_TINY_SIZE, num_attention_heads=2, max_position_embeddings=512, type_vocab_size=2)
LLAMA_CONFIG = dict(_TINY_SIZE, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                    tie_word_embeddings=True)


def _corpus() -> list[str]:
    return list(CORPUS) + list(_COVERAGE)


def _random_model(model_cls, config, seed: int):
    """Instantiate `model_cls(config)` with weights drawn from `seed`, leaving the global RNG alone."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.eval()
    return model


_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _wordpiece_vocab(bpe_size: int) -> dict[str, int]:
    """A WordPiece vocabulary learnt from the corpus, identical on every build.

    The `tokenizers` WordPiece trainer is not deterministic (its `##` pieces come out of a hash map),
    its plain BPE trainer is: learn BPE pieces with BERT's normaliser and pre-tokeniser, then use
    each piece both word-initially (`piece`) and inside a word (`##piece`).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.normalizer = normalizers.BertNormalizer(lowercase=True)
    bpe.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size, min_frequency=1, special_tokens=_BERT_SPECIALS, show_progress=False
    )
    bpe.train_from_iterator(_corpus(), trainer)
    pieces = [tok for tok, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]) if tok not in _BERT_SPECIALS]
    tokens = _BERT_SPECIALS + pieces + ["##" + piece for piece in pieces]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tiny_encoder(folder: str | Path, seed: int = 0, vocab_size: int = 1500) -> Path:
    """Write a tiny random BERT encoder + WordPiece tokenizer to `folder`; return the folder.

    The weights are a `BertModel` (like a sentence-transformers folder): loading it with
    `AutoModelForSequenceClassification.from_pretrained(folder, num_labels=N)` adds a new head.
    """
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    wordpiece = BertWordPieceTokenizer(vocab=_wordpiece_vocab(vocab_size), lowercase=True)
    tokenizer = BertTokenizerFast(
        tokenizer_object=wordpiece._tokenizer,
        do_lower_case=True,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=ENCODER_CONFIG["max_position_embeddings"],
    )

    config = BertConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        **ENCODER_CONFIG,
    )
    model = _random_model(BertModel, config, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_llama(folder: str | Path, seed: int = 0, vocab_size: int = 2048, **config) -> Path:
    """Write a tiny random Llama causal LM + byte-level BPE tokenizer (ChatML) to `folder`; return it. `config`
    overrides LLAMA_CONFIG (e.g. `head_dim=32`: vLLM's CPU attention takes head sizes from 32 up).

    Special tokens as in SmolLM2: `<|endoftext|>` (0, unk), `<|im_start|>` (1, bos), `<|im_end|>`
    (2, eos and pad). Loads with `AutoModelForCausalLM` and `AutoModelForSequenceClassification`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Capitalised copies too: chat prompts are not lower-cased.
    corpus = _corpus()
    corpus += [line.capitalize() for line in CORPUS]
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=LLAMA_CONFIG["max_position_embeddings"],
    )

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**LLAMA_CONFIG, **config},
    )
    model = _random_model(LlamaForCausalLM, config, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


BUILDERS = {"encoder": build_tiny_encoder, "llama": build_tiny_llama}
