"""Reads a server's Prometheus text exposition into samples, for the /metrics tests."""

from __future__ import annotations

import re

import httpx

SAMPLE = re.compile(r"^([a-z0-9_:]+)\{([^}]*)\} ([0-9.e+-]+)$")


def scrape(url: str) -> tuple[str, dict[tuple[str, frozenset], float]]:
    """(the text of url/metrics, {(name, frozenset of (label, '"value"')): value}) of its labelled samples."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            labels = frozenset(tuple(part.split("=", 1)) for part in re.findall(r'\w+="[^"]*"', match.group(2)))
            samples[(match.group(1), labels)] = float(match.group(3))
    return text, samples
