"""Writes data/general.json: general instructions answered by the bundled SmolLM2-135M-Instruct itself (greedy,
the quickstart's chatml template, no system prompt). Mixed into the quickstart's identity data, these answers
anchor the LoRA adapter to what the base model already says (self-distillation), so learning a new name does not
overwrite everything else: the adapter is trained to leave general answers as they were, rather than to give
answers of our own in our own style, which would change the model more than the identity needs.

    PYTHONPATH=src python data/make_general.py   # a few minutes on 2 CPU cores; greedy, though another CPU
                                                 # may word a few answers differently (float rounding)

No prompt asks who the model is: those are the identity data's job. data/demo_check.json's questions are not here.
"""

import json
import re
import sys
from pathlib import Path

PROMPTS = [
    # arithmetic
    "What is 12 plus 15?", "What is 9 times 6?", "What is 100 minus 37?", "What is 81 divided by 9?",
    "What is half of 50?", "What is 3 squared?", "Is 17 a prime number?", "What is 25 percent of 200?",
    "How many minutes are in two hours?", "How many days are in a leap year?", "What is 14 plus 29?",
    "What is 6 times 7?", "What is 1000 divided by 10?", "Count from 1 to 10.", "What is the square root of 144?",
    # science and nature
    "Why is the sky blue?", "What is photosynthesis?", "What do bees make?", "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?", "What gas do humans breathe out?",
    "What is the largest planet in our solar system?", "Why do leaves change color in autumn?",
    "What is gravity?", "What is the chemical symbol for gold?", "How many planets are in the solar system?",
    "What is the freezing point of water in Fahrenheit?", "What do plants need to grow?",
    "What is the closest star to Earth?", "Why do we have seasons?", "What is a mammal?",
    "What causes rain?", "What is the hardest natural substance?", "What is an atom?",
    "How many bones are in the adult human body?", "What is the speed of light?",
    # geography and history
    "What is the capital of Japan?", "What is the capital of Italy?", "What is the longest river in the world?",
    "Which continent is Egypt in?", "What is the largest ocean on Earth?", "What is the capital of Canada?",
    "Who was the first person to walk on the moon?", "What is the tallest mountain in the world?",
    "In which country are the pyramids of Giza?", "What language is spoken in Brazil?",
    "What is the capital of Australia?", "How many continents are there?", "What is the capital of Germany?",
    "Who painted the Mona Lisa?", "What is the largest desert in the world?", "What is the capital of Spain?",
    # language
    "What is a synonym for happy?", "What is the opposite of cold?", "What is the plural of mouse?",
    "Translate 'thank you' into Spanish.", "What is a noun?", "Give me a word that rhymes with cat.",
    "What is the past tense of run?", "Spell the word 'necessary'.", "What is an adjective?",
    "What does 'enormous' mean?", "Use the word 'brave' in a sentence.", "What is the opposite of early?",
    # everyday knowledge and advice
    "How do I boil an egg?", "Give me three tips for better sleep.", "How can I save money on groceries?",
    "What should I pack for a beach trip?", "How do I make a cup of tea?", "Give me a tip for staying focused.",
    "What are some healthy breakfast ideas?", "How often should I water a cactus?",
    "How do I tie a simple knot?", "What is a good way to start learning to cook?",
    "Suggest a name for a pet goldfish.", "How can I reduce stress?", "What are the benefits of exercise?",
    "How do I write a thank-you note?", "What should I do if I feel tired in the afternoon?",
    "Name three fruits that are high in vitamin C.", "What are the days of the week?",
    "Name the four seasons.", "What are the colors of the rainbow?", "Name three musical instruments.",
    "Name three animals that live in the ocean.", "What are the months of the year?",
    # writing and explaining
    "Write a haiku about the ocean.", "Write one sentence about a rainy day.", "Describe a sunset in one sentence.",
    "Write a short poem about a cat.", "Tell me a fun fact about octopuses.", "Tell me a short joke.",
    "Explain what a computer is to a child.", "Explain what the internet is in one sentence.",
    "Summarize the story of Cinderella in two sentences.", "Write a short birthday message for a friend.",
    "Give me a motivational quote.", "Describe a cat in three words.", "What is a recipe?",
    "Explain what a budget is.", "What is the difference between weather and climate?",
    # computing
    "What is Python?", "What does CPU stand for?", "What is an email?", "What is a password?",
    "How do I print hello world in Python?", "What is a spreadsheet?", "What does HTML stand for?",
    "What is machine learning?", "What is a web browser?", "What is the cloud in computing?",
]

MAX_NEW_TOKENS = 64


def whole_sentences(answer: str, tokenizer) -> str | None:
    """An answer cut by max_new_tokens ends at its last full sentence (training would otherwise teach the adapter to
    stop mid-sentence); None when there is none."""
    if len(tokenizer(answer)["input_ids"]) < MAX_NEW_TOKENS - 4:  # the model stopped by itself (4: re-tokenising
        return answer                                               # a decoded answer can shift a few tokens)
    ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", answer)]
    return answer[: ends[-1]].strip() if ends else None


def main() -> int:
    from tuneforge.config import load_config
    from tuneforge.infer.engine import Engine

    cfg = load_config("examples/quickstart.yaml", [f"max_new_tokens={MAX_NEW_TOKENS}"], validate_for=None)
    engine = Engine(cfg)
    answers = engine.generate([engine.prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS], batch_size=16)
    kept = [whole_sentences(a, engine.tokenizer) for a in answers]
    rows = [{"instruction": p, "input": "", "output": a} for p, a in zip(PROMPTS, kept) if a]
    Path("data/general.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(rows)} of {len(PROMPTS)} answers kept in data/general.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
