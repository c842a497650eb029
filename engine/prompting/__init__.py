"""Prompting without torch: templates (`render`), prompt sets (`library`), answer formats (`outputs`), parsing
(`parse`) and chat formatting (`chat`, duck-typed on a tokenizer). The model side is `engine.methods.prompt`."""
