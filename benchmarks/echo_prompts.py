"""Chat prompts whose answer repeats part of the prompt (copying text, fixing a typo in code): the
workload on which n-gram speculation (prompt lookup) has something to find.

The texts are written here, not read from the standard library or the repository, so the workload
is the same on every machine and at every commit. 8 paragraphs and 8 functions, each under ~120
tokens, times 4 instructions each: 64 distinct conversations, the mix alternating prose and code.
"""

from __future__ import annotations

import re

PROSE = (
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "The farmers moved their animals to the hill behind the church and waited for the rain to stop. "
    "By noon the sky had cleared, but the water kept rising for two more days.",
    "A good benchmark measures one thing at a time. It fixes the workload, the hardware and the "
    "software version, runs long enough to average out noise, and reports how it was run so that "
    "someone else can repeat it and get the same numbers.",
    "The library opens at nine in the morning and closes at six in the evening. Books may be borrowed "
    "for three weeks and renewed twice, unless another reader has reserved them. Late returns cost "
    "twenty cents per day.",
    "To make bread, mix flour, water, salt and yeast into a soft dough. Knead it for ten minutes, let "
    "it rise in a warm place until it doubles in size, shape it into a loaf, and bake it in a hot oven "
    "for about forty minutes.",
    "The committee met on Tuesday to review the budget for next year. After a long discussion, it "
    "agreed to increase spending on roads and schools, to delay the new sports hall, and to publish "
    "the full accounts online.",
    "Light from the sun takes about eight minutes to reach the earth. Light from the nearest star "
    "other than the sun takes more than four years, so when we look at the night sky we see every "
    "star as it was long ago.",
    "Please remember to lock the front door when you leave the office. The last person out should "
    "also switch off the lights, close the windows on the second floor, and make sure the coffee "
    "machine is turned off.",
    "The train to the coast leaves every hour from platform four. The journey takes ninety minutes, "
    "with stops at the airport and the old harbour. Tickets bought online are cheaper than those "
    "bought at the station.",
)

CODE = (
    "def mean(values):\n"
    "    total = 0\n"
    "    count = 0\n"
    "    for value in values:\n"
    "        total += value\n"
    "        count += 1\n"
    "    if count == 0:\n"
    "        return 0.0\n"
    "    return total / count",
    "def find_index(items, target):\n"
    "    low, high = 0, len(items) - 1\n"
    "    while low <= high:\n"
    "        middle = (low + high) // 2\n"
    "        if items[middle] == target:\n"
    "            return middle\n"
    "        if items[middle] < target:\n"
    "            low = middle + 1\n"
    "        else:\n"
    "            high = middle - 1\n"
    "    return -1",
    "def count_words(text):\n"
    "    counts = {}\n"
    "    for word in text.split():\n"
    "        word = word.lower().strip('.,!?')\n"
    "        if word:\n"
    "            counts[word] = counts.get(word, 0) + 1\n"
    "    return counts",
    "class Stack:\n"
    "    def __init__(self):\n"
    "        self.items = []\n"
    "\n"
    "    def push(self, item):\n"
    "        self.items.append(item)\n"
    "\n"
    "    def pop(self):\n"
    "        if not self.items:\n"
    "            raise IndexError('pop from an empty stack')\n"
    "        return self.items.pop()",
    "def read_config(path):\n"
    "    settings = {}\n"
    "    with open(path) as handle:\n"
    "        for line in handle:\n"
    "            line = line.strip()\n"
    "            if not line or line.startswith('#'):\n"
    "                continue\n"
    "            key, value = line.split('=', 1)\n"
    "            settings[key.strip()] = value.strip()\n"
    "    return settings",
    "def fibonacci(limit):\n"
    "    numbers = [0, 1]\n"
    "    while numbers[-1] + numbers[-2] < limit:\n"
    "        numbers.append(numbers[-1] + numbers[-2])\n"
    "    return numbers",
    "def merge_sorted(left, right):\n"
    "    result = []\n"
    "    i = j = 0\n"
    "    while i < len(left) and j < len(right):\n"
    "        if left[i] <= right[j]:\n"
    "            result.append(left[i])\n"
    "            i += 1\n"
    "        else:\n"
    "            result.append(right[j])\n"
    "            j += 1\n"
    "    return result + left[i:] + right[j:]",
    "def is_palindrome(text):\n"
    "    letters = [c.lower() for c in text if c.isalnum()]\n"
    "    start, end = 0, len(letters) - 1\n"
    "    while start < end:\n"
    "        if letters[start] != letters[end]:\n"
    "            return False\n"
    "        start += 1\n"
    "        end -= 1\n"
    "    return True",
)

# {text}: the text as written; {typo}: the text with one misspelt word.
PROSE_TASKS = (
    "Repeat the following text exactly, with no commentary:\n\n{text}",
    "Copy this paragraph word for word:\n\n{text}",
    "Fix the spelling mistake in this paragraph and output the whole paragraph:\n\n{typo}",
    "Here is a note from a colleague:\n\n{text}\n\nPlease repeat it back to me verbatim.",
)
CODE_TASKS = (
    "Repeat this code exactly:\n\n```python\n{text}\n```",
    "Fix the typo in this code and output the whole code:\n\n```python\n{typo}\n```",
    "Output this function unchanged, inside a code block:\n\n```python\n{text}\n```",
    "Add a docstring to this function and output the whole function:\n\n```python\n{text}\n```",
)


def with_typo(text: str) -> str:
    """The text with the first word of six or more letters misspelt (its 2nd and 3rd letters swapped)."""
    match = re.search(r"[A-Za-z]{6,}", text)
    if match is None:
        return text
    word = match.group()
    misspelt = word[0] + word[2] + word[1] + word[3:]
    return text[: match.start()] + misspelt + text[match.end() :]


def echo_conversations(count: int) -> list[list[dict[str, str]]]:
    """`count` one-message chats; the first 16 use the plain "repeat" instructions, then the others.

    Prompt i takes text i // 2 % 8 of prose (even i) or code (odd i), so any prefix of the list mixes
    both. Past 64 the list repeats."""
    conversations = []
    for i in range(count):
        texts, tasks = (PROSE, PROSE_TASKS) if i % 2 == 0 else (CODE, CODE_TASKS)
        text = texts[i // 2 % len(texts)]
        task = tasks[i // (2 * len(texts)) % len(tasks)]
        conversations.append([{"role": "user", "content": task.format(text=text, typo=with_typo(text))}])
    return conversations
