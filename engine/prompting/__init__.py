"""Prompting without torch: templates (`render`), prompt sets (`library`), answer formats (`outputs`), parsing
(`parse`) and chat formatting (`chat`, duck-typed on a tokenizer). Shared by the `prompt` and `llm-finetune`
methods, whose model side is the decoding library `engine.decoding`, and by the `openai` method, which sends the
same prompts to a server."""
