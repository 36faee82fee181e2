"""The lossless test's prompts: code, prose, a chat conversation, and non-ASCII text."""
from __future__ import annotations

from shared.protocol import ChatMessage

RAW = [
    "def fibonacci(n):\n",
    "import json\n\ndef load_config(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "// Binary search in C\nint binary_search(int *a, int n, int key) {\n",
    "SELECT name, COUNT(*) FROM orders\n",
    "fn main() {\n    let v = vec![3, 1, 2];\n",
    "The history of the printing press begins",
    "Once upon a time, in a small village by the sea,",
    "The three laws of thermodynamics are",
    "Instructions for brewing a good cup of tea:\n1.",
    "La crème brûlée est un dessert français composé",
    "Él llegó a la estación después de las once y",
    "東京は日本の首都であり、",
    "Today was a great day 🎉 because",
]

CHAT = [
    [ChatMessage(role="user", content="Write a Python function that reverses a string.")],
    [
        ChatMessage(role="system", content="You are a concise assistant."),
        ChatMessage(role="user", content="What is the capital of France?"),
        ChatMessage(role="assistant", content="Paris."),
        ChatMessage(role="user", content="And of Italy? Answer in one sentence."),
    ],
]

