"""Safe YAML loading that remembers where every value came from.

PyYAML builds the node graph (it never constructs Python objects from tags here); this
module turns nodes into plain data itself, so it can:
- record the line/column of every key and value (for FILE:LINE:COL errors),
- reject duplicate keys, non-standard tags (`!!python/object` is never executed),
- bound the work an alias bomb or deep nesting can cause,
- refuse files that are too large, empty, not UTF-8, or not a mapping at the top.
Every problem becomes a ConfigError with a position, never a traceback.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftkit.errors import ConfigError, ConfigIssue
from ftkit.files import TooLarge, UnsafeFile, read_bounded
from ftkit.text import printable  # noqa: F401  (re-exported: recipe code says yamlpos.printable)

MAX_BYTES = 1 << 20  # 1 MiB: recipes are hand-written; anything larger is a mistake or an attack
MAX_NODES = 200_000  # values after alias expansion
MAX_DEPTH = 64

Path_ = tuple[str | int, ...]

_SCALAR_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"

try:  # libyaml's parser is several times faster; positions are identical
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _Loader = yaml.SafeLoader


@dataclass
class Located:
    """A loaded document: plain data plus the position of every path in it."""

    file: str
    data: dict[str, Any]
    values: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path_, tuple[int, int]] = field(default_factory=dict)

    def where(self, path: Path_, *, key: bool = False) -> tuple[int, int]:
        """Best position for a path: the key itself if asked and known, else the value,
        else the nearest ancestor that has a position."""
        p = tuple(path)
        while True:
            if key and p in self.keys:
                return self.keys[p]
            if p in self.values:
                return self.values[p]
            if p in self.keys:
                return self.keys[p]
            if not p:
                return (1, 1)
            p = p[:-1]

    def issue(self, path: Path_, message: str, *, key: bool = False) -> ConfigIssue:
        line, col = self.where(path, key=key)
        return ConfigIssue(self.file, line, col, format_path(path), one_line(message))


def format_path(path: Path_) -> str:
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            text = printable(str(part))
            if not text or any(c in text for c in ". []"):
                text = repr(text)  # a key like 'a.b' or '' stays readable as one key
            out += ("." if out else "") + text
    return out


def one_line(message: str) -> str:
    """A message with any control character escaped (backslashes kept): one line, always."""
    return "".join(ch if ch == " " or ch.isprintable() else printable(ch) for ch in message)


def _fail(file: str, line: int, col: int, message: str, path: Path_ = ()) -> ConfigError:
    return ConfigError([ConfigIssue(one_line(file), line, col, format_path(path), one_line(message))])


def special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def read_text(path: str | os.PathLike[str], *, display: str | None = None) -> str:
    """Read a config file as UTF-8 text, with one clear error for each way it can't be.

    Only regular files are read. The check is made on the open descriptor (no race with a
    rename), and the open itself never blocks: O_NONBLOCK makes opening a FIFO return at once,
    and O_NOCTTY keeps a terminal device from becoming ours."""
    name = display or str(path)
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise _fail(name, 0, 0, "no such file") from None
    except OSError as e:
        raise _fail(name, 0, 0, f"cannot read: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise _fail(name, 0, 0, "is a directory, not a YAML file")
    if not stat.S_ISREG(st.st_mode):
        raise _fail(name, 0, 0, f"is {special_kind(st.st_mode)}, not a regular file")
    if st.st_size > MAX_BYTES:
        raise _fail(name, 0, 0, f"file is {st.st_size} bytes; the limit is {MAX_BYTES} bytes")
    try:  # the look above names the common cases; this read holds if the file changes meanwhile
        raw = read_bounded(p, MAX_BYTES, follow=True)
    except TooLarge:  # a file that grew while we looked
        raise _fail(name, 0, 0, f"file is larger than the limit of {MAX_BYTES} bytes") from None
    except UnsafeFile as e:
        raise _fail(name, 0, 0, f"cannot read: {e.reason}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        before = raw[: e.start]
        line = before.count(b"\n") + 1
        col = e.start - (before.rfind(b"\n") + 1) + 1
        raise _fail(name, line, col, f"not UTF-8: byte 0x{raw[e.start]:02x} cannot be decoded") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\x00" in text:
        off = text.index("\x00")
        line = text.count("\n", 0, off) + 1
        raise _fail(name, line, 1, "file contains a NUL byte (binary file?)")
    return text


def load(path: str | os.PathLike[str], *, display: str | None = None) -> Located:
    """Load a YAML mapping with positions. Raises ConfigError for anything unusable."""
    name = display or str(path)
    return loads(read_text(path, display=name), name)


def loads(text: str, name: str) -> Located:
    if not text.strip() or all(
        not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()
    ):
        raise _fail(name, 1, 1, "file is empty")
    try:
        nodes = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = (e.problem or e.context or "invalid YAML").strip()
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise _fail(name, line, col, f"YAML syntax error: {problem}") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (control characters)
        before = text[: e.position]
        line = before.count("\n") + 1
        col = e.position - (before.rfind("\n") + 1) + 1
        char = e.character if isinstance(e.character, str) else chr(e.character)
        raise _fail(name, line, col, f"character U+{ord(char):04X} is not allowed in YAML (control character)") from None
    except yaml.YAMLError as e:  # pragma: no cover - other unmarked errors are rare
        raise _fail(name, 1, 1, f"YAML error: {printable(str(e).splitlines()[0] if str(e) else type(e).__name__)}") from None
    nodes = [n for n in nodes if n is not None]
    if not nodes:
        raise _fail(name, 1, 1, "file is empty")
    if len(nodes) > 1:
        second = nodes[1].start_mark
        raise _fail(name, second.line + 1, second.column + 1, "more than one YAML document; keep one per file")
    root = nodes[0]
    if not isinstance(root, yaml.MappingNode):
        kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
        raise _fail(
            name, root.start_mark.line + 1, root.start_mark.column + 1, f"top level must be a mapping, got {kind}"
        )
    doc = Located(name, {})
    conv = _Converter(doc)
    data = conv.convert(root, (), 0)
    if conv.issues:
        raise ConfigError(conv.issues)
    doc.data = data
    return doc


class _Converter:
    def __init__(self, doc: Located) -> None:
        self.doc = doc
        self.count = 0
        self.issues: list[ConfigIssue] = []
        self.scalar_loader = yaml.SafeLoader("")
        self.active: set[int] = set()  # nodes on the current path, to catch recursive aliases

    def _pos(self, node: yaml.Node) -> tuple[int, int]:
        return (node.start_mark.line + 1, node.start_mark.column + 1)

    def _stop(self, node: yaml.Node, path: Path_, message: str) -> ConfigError:
        line, col = self._pos(node)
        return _fail(self.doc.file, line, col, message, path)

    def convert(self, node: yaml.Node, path: Path_, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise self._stop(node, path, f"document expands to more than {MAX_NODES} values (alias bomb?)")
        if depth > MAX_DEPTH:
            raise self._stop(node, path, f"nesting deeper than {MAX_DEPTH} levels")
        if id(node) in self.active:
            raise self._stop(node, path, "recursive alias: a value contains itself")
        self.doc.values.setdefault(path, self._pos(node))
        if isinstance(node, yaml.ScalarNode):
            if node.tag == "tag:yaml.org,2002:timestamp" and not node.style:
                raise self._stop(node, path, f"{node.value!r} reads as a date; quote it")
            if node.tag not in _SCALAR_TAGS:
                raise self._stop(node, path, f"tag {node.tag!r} is not allowed (only plain YAML values)")
            try:
                return self.scalar_loader.construct_object(node)
            except (yaml.YAMLError, ValueError) as e:
                raise self._stop(node, path, f"bad value: {e}") from None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                if node.tag != _SEQ_TAG:
                    raise self._stop(node, path, f"tag {node.tag!r} is not allowed (only plain YAML values)")
                return [self.convert(child, path + (i,), depth + 1) for i, child in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode):
                if node.tag != _MAP_TAG:
                    raise self._stop(node, path, f"tag {node.tag!r} is not allowed (only plain YAML values)")
                return self._mapping(node, path, depth)
        finally:
            self.active.discard(id(node))
        raise self._stop(node, path, "unsupported YAML node")  # pragma: no cover

    def _mapping(self, node: yaml.MappingNode, path: Path_, depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        explicit: set[Any] = set()
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *defaults` - explicit keys win, in either order
                merged = self.convert(value_node, path, depth + 1)
                sources = merged if isinstance(merged, list) else [merged]
                for src in sources:
                    if not isinstance(src, dict):
                        raise self._stop(value_node, path, "`<<` must merge a mapping")
                    for k, v in src.items():
                        if k not in explicit:
                            out[k] = v
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise self._stop(key_node, path, "mapping keys must be plain values, not lists or mappings")
            key = self.convert(key_node, path + ("<key>",), depth + 1)
            self.doc.values.pop(path + ("<key>",), None)
            if isinstance(key, (list, dict)) or key is None:
                raise self._stop(key_node, path, "mapping keys must be strings or numbers")
            if isinstance(key, bool):
                # YAML 1.1 reads `on:`/`yes:` as true; say so instead of a confusing later error
                raise self._stop(key_node, path, f"key {key_node.value!r} reads as a boolean; quote it")
            if key in explicit:
                line, col = self._pos(key_node)
                first = self.doc.keys.get(path + (key,), (0, 0))
                self.issues.append(
                    ConfigIssue(
                        self.doc.file, line, col, format_path(path + (key,)),
                        f"duplicate key {key!r} (first defined at line {first[0]})",
                    )
                )
                continue
            explicit.add(key)
            self.doc.keys[path + (key,)] = self._pos(key_node)
            out[key] = self.convert(value_node, path + (key,), depth + 1)
            self.doc.values[path + (key,)] = self._pos(value_node)
        return out
