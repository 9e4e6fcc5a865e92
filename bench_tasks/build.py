"""Build kld150.jsonl (HumanEval format) from kld150.txt, the readable source of the tasks.

    python bench_tasks/build.py

kld150.txt holds one block per task:

    === entry_point
    <prompt: imports, the function's signature and docstring>
    ---
    <canonical_solution: the function's body>
    ---
    <the body of check(candidate): asserts on candidate>

The task ids are "kld/<n>" in the order of the file.
"""

import json
from pathlib import Path

HERE = Path(__file__).parent


def parse_tasks(text: str) -> list[dict]:
    tasks = []
    for n, block in enumerate(text.split("=== ")[1:]):
        header, _, rest = block.partition("\n")
        prompt, solution, test = rest.split("\n---\n")
        tasks.append({"task_id": f"kld/{n}", "prompt": prompt.rstrip("\n") + "\n", "entry_point": header.strip(),
                      "canonical_solution": solution.rstrip("\n") + "\n",
                      "test": "def check(candidate):\n" + test.rstrip("\n") + "\n"})
    return tasks


def to_jsonl(tasks: list[dict]) -> str:
    return "".join(json.dumps(t) + "\n" for t in tasks)


if __name__ == "__main__":
    tasks = parse_tasks((HERE / "kld150.txt").read_text())
    (HERE / "kld150.jsonl").write_text(to_jsonl(tasks))
    print(f"{len(tasks)} tasks -> {HERE / 'kld150.jsonl'}")
