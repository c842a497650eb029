"""Prompt templates as files (the paper's Listings first). `PROMPTS_DIR` is where they live."""
from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parent
