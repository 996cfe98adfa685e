"""Input data: corpus, chat templates, tokenized sequences with loss masks, prompts."""
