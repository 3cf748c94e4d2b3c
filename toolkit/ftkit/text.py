"""Text shown to people that came from outside (a recipe, a file in a shared directory, a
server's answer): escaped so it cannot steer the terminal or hide on another line.

A module of its own, importing nothing of ftkit, so every layer (the lease inside a
container included) can escape what it prints without pulling in the recipe parser."""

from __future__ import annotations


def printable(s: str) -> str:
    """`s` with every control or invisible character escaped (\\n, \\t, \\x1b, \\u202e, ...)
    and backslashes doubled, so what a person reads is what runs: no terminal escape, carriage
    return or right-to-left override can hide a flag in a printed command line, and every
    message stays on one line."""
    out: list[str] = []
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == " " or ch.isprintable():
            out.append(ch)
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def terminal_safe(text: str) -> str:
    """`text` with its line breaks kept and every other control or invisible character
    escaped, backslashes left alone: the last pass over an error message before it reaches a
    terminal (parts already escaped with printable() are not escaped twice). A file name or a
    server's words inside the message can then neither steer the terminal nor fake a line."""
    return "\n".join("".join(ch if ch == " " or ch.isprintable() else printable(ch) for ch in line)
                     for line in text.split("\n"))
