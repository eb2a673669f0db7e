"""The shape of the package, read from its source with C{ast}.

Rules that keep the rooms apart (docs/flow.md): only L{mta.spool} knows the
layout on disk; the scheduler's decisions need no Twisted; modules import
one another without cycles and without imports hidden in functions; the
queue's functions stay short enough to read.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from twisted.trial.unittest import SynchronousTestCase

from mta.envelope import QueueState

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mta")
TESTS = os.path.dirname(os.path.abspath(__file__))
MAX_FUNCTION_LINES = 60


@dataclass
class Module:
    name: str
    path: str
    tree: ast.Module
    imports: list[tuple[str, int, bool]] = field(default_factory=list)  # (module, line, lazy)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(rel)


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def _imports(tree: ast.Module, known: set[str], package: str) -> list[tuple[str, int, bool]]:
    """Every import of the module: (imported module, line, inside a function).

    Imports under C{if TYPE_CHECKING:} are left out: they never run.  C{from
    a import b} counts as importing C{a.b} when that is a module.
    """
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                continue
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    out.append((full if full in known else base, child.lineno, inner))
            visit(child, inner)

    visit(tree, False)
    return out


def modules() -> dict[str, Module]:
    found: dict[str, Module] = {}
    paths = []
    for dirpath, _, files in os.walk(ROOT):
        paths += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
    names = {_module_name(p) for p in paths}
    for path in sorted(paths):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        name = _module_name(path)
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        found[name] = Module(name, path, tree, _imports(tree, names, package))
    return found


_STATES = "|".join([*(s.value for s in QueueState), "tmp"])
_PATH = re.compile(rf"(?:^|/)(?:{_STATES})/[\w.-]")
_FS_CALLS = {"join", "open", "scandir", "listdir", "rename", "replace", "stat", "isdir",
             "exists", "makedirs", "mkdir", "remove", "unlink", "utime", "rmtree"}  # fmt: skip


def _state_paths(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Strings that build a path from a state's name (see the test that uses it)."""
    names = {s.value for s in QueueState} | {"tmp"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in _FS_CALLS:
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and str(arg.value).rstrip("/") in names:
                        yield node.lineno, str(arg.value)
        elif isinstance(node, ast.JoinedStr):
            parts = node.values
            for part, after in zip(parts, [*parts[1:], None], strict=True):
                if not (isinstance(part, ast.Constant) and isinstance(part.value, str)):
                    continue
                text = part.value
                if _PATH.search(text) or (
                    isinstance(after, ast.FormattedValue)
                    and re.search(rf"(?:^|/)(?:{_STATES})/$", text)
                ):
                    yield node.lineno, text
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _PATH.search(node.value)
        ):
            yield node.lineno, node.value


# The modules that read the whole configuration: its parser, the composition
# root that builds every part's own settings from it, and the command lines.
CONFIG_READERS = {"mta.config", "mta.service", "mta.tap", "mta.cli", "mta.sendmail"}


def _names_config(annotation: ast.expr | None) -> bool:
    """Whether a type annotation names L{mta.config.Config}."""
    if annotation is None:
        return False
    for node in ast.walk(annotation):
        if isinstance(node, ast.Name) and node.id == "Config":
            return True
        if isinstance(node, ast.Attribute) and node.attr == "Config":
            return True
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.search(r"\bConfig\b", node.value)
        ):
            return True
    return False


def _whole_config(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Where a module could reach the whole configuration (see the test that uses it)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.module == "mta.config":
                for alias in node.names:
                    if alias.name == "Config":
                        yield node.lineno, "imports Config"
            if node.module == "mta" and any(a.name == "config" for a in node.names):
                yield node.lineno, "imports the module mta.config"
        elif isinstance(node, ast.Import):
            if any(a.name == "mta.config" for a in node.names):
                yield node.lineno, "imports the module mta.config"
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            for arg in every:
                if arg is None:
                    continue
                if arg.arg == "config" or _names_config(arg.annotation):
                    name = getattr(node, "name", "lambda")
                    yield arg.lineno, f"{name}() takes the configuration as {arg.arg!r}"
        elif isinstance(node, ast.ClassDef):
            fields = [
                item
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            ]
            for item in fields:
                assert isinstance(item.target, ast.Name)
                if item.target.id == "config" or _names_config(item.annotation):
                    yield item.lineno, f"{node.name}.{item.target.id} holds the configuration"


class ArchitectureTests(SynchronousTestCase):
    """The import graph and the size of the queue's functions."""

    def setUp(self) -> None:
        self.modules = modules()

    def outside_spool(self) -> list[Module]:
        return [m for m in self.modules.values() if not m.name.startswith("mta.spool")]

    def test_the_rules_see_the_package(self) -> None:
        # A walk that finds nothing would pass every rule below.
        self.assertIn("mta.queue.manager", self.modules)
        self.assertIn("mta.spool.fs", self.modules)
        manager = self.modules["mta.queue.manager"]
        self.assertIn("mta.queue.scheduler", {name for name, _, _ in manager.imports})

    def test_only_the_spool_imports_its_file_layer(self) -> None:
        offenders = [
            f"{m.name}:{line}"
            for m in self.outside_spool()
            for name, line, _ in m.imports
            if name == "mta.spool.fs"
        ]
        self.assertEqual(offenders, [])

    def test_only_the_spool_spells_a_state_directory(self) -> None:
        """No path is built from a state's name outside L{mta.spool}: neither a
        file system call with one (C{os.path.join(root, "deferred")}) nor a
        path written out (C{"deferred/ID"}, C{f"deferred/{qid}"}).  Texts for
        people may still name a directory ("moved to corrupt/")."""
        offenders = [
            f"{m.name}:{line} {text!r}"
            for m in self.outside_spool()
            for line, text in _state_paths(m.tree)
        ]
        self.assertEqual(offenders, [])

    def test_scheduler_needs_no_twisted(self) -> None:
        """Not even through what it imports; nor do traffic shaping's decisions,
        the dispatcher and the manager's bookkeeping."""
        seen: set[str] = set()
        todo = ["mta.queue.scheduler", "mta.queue.shaping", "mta.queue.shaping_rules",
                "mta.queue.dispatch", "mta.queue.bookkeeping"]  # fmt: skip
        twisted: list[str] = []
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for imported, line, _ in self.modules[name].imports:
                if imported.split(".")[0] == "twisted":
                    twisted.append(f"{name}:{line} imports {imported}")
                if imported in self.modules:
                    todo.append(imported)
        self.assertEqual(twisted, [])
        self.assertIn("mta.bounce", seen)
        self.assertIn("mta.queue.shaping_rules", seen)

    def test_no_import_cycles(self) -> None:
        graph = {
            m.name: {n for n, _, lazy in m.imports if n in self.modules and not lazy}
            for m in self.modules.values()
        }
        for name, edges in graph.items():
            edges.discard(name)  # "from mta.spool import fs" inside mta.spool itself
        cycles = []
        state: dict[str, int] = {}  # 1 visiting, 2 done
        path: list[str] = []

        def visit(node: str) -> None:
            state[node] = 1
            path.append(node)
            for nxt in sorted(graph[node]):
                if state.get(nxt) == 1:
                    cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
                elif nxt not in state:
                    visit(nxt)
            path.pop()
            state[node] = 2

        for node in sorted(graph):
            if node not in state:
                visit(node)
        self.assertEqual(cycles, [])

    def test_no_lazy_imports_of_our_own_modules(self) -> None:
        """An import inside a function hides a cycle; third-party ones (dkimpy) may wait."""
        offenders = [
            f"{m.name}:{line} imports {name}"
            for m in self.modules.values()
            for name, line, lazy in m.imports
            if lazy and name.split(".")[0] == "mta"
        ]
        self.assertEqual(offenders, [])

    def test_queue_functions_are_short(self) -> None:
        long = []
        for m in self.modules.values():
            if not m.name.startswith("mta.queue"):
                continue
            for node in ast.walk(m.tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    assert node.end_lineno is not None
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{m.name}.{node.name}: {lines} lines")
        self.assertEqual(long, [])

    def test_only_the_composition_root_passes_the_whole_config_around(self) -> None:
        """Each part gets its own frozen settings (C{SessionSettings} and
        C{SessionLimits}, C{ThrottleSettings}, C{PluginContext}, the sections
        of the queue, retention and spool), built from L{mta.config.Config} in
        L{mta.service}: no other module imports C{Config} or the module that
        loads it, takes it as a parameter (typed, or named C{config}) or keeps
        it in a field.  So a session, a plugin or the queue cannot come to
        depend on an option that a reload does not hand it."""
        offenders = [
            f"{m.name}:{line} {what}"
            for m in self.modules.values()
            if m.name not in CONFIG_READERS
            for line, what in _whole_config(m.tree)
        ]
        self.assertEqual(offenders, [])

    def test_the_config_rule_sees_each_way_in(self) -> None:
        """The rule above finds each way the whole configuration could come in."""
        source = """
from mta.config import Config, LimitsConfig
from mta import config as configmod
import mta.config

def typed(c: Config) -> None: ...
def named(config) -> None: ...
def quoted(*, c: "Config | None") -> None: ...
def through_the_module(c: configmod.Config) -> None: ...

class Holder:
    config: object
    whole: Config
    limits: LimitsConfig
"""
        found = [what for _, what in _whole_config(ast.parse(source))]
        self.assertEqual(
            sorted(found),
            sorted(
                [
                    "imports Config",
                    "imports the module mta.config",
                    "imports the module mta.config",
                    "typed() takes the configuration as 'c'",
                    "named() takes the configuration as 'config'",
                    "quoted() takes the configuration as 'c'",
                    "through_the_module() takes the configuration as 'c'",
                    "Holder.config holds the configuration",
                    "Holder.whole holds the configuration",
                ]
            ),
        )


def _test_classes() -> Iterator[tuple[str, ast.ClassDef]]:
    """Every class under tests/ that holds tests, or that test classes build on."""
    classes: dict[str, list[tuple[str, ast.ClassDef]]] = {}
    for dirpath, _, files in os.walk(TESTS):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    if isinstance(node, ast.ClassDef):
                        classes.setdefault(node.name, []).append((path, node))

    def bases(node: ast.ClassDef) -> set[str]:
        return {ast.unparse(b).rpartition(".")[2] for b in node.bases}

    testy = {"TestCase", "SynchronousTestCase"}
    for found in classes.values():
        for _, node in found:
            if any(
                isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                and item.name.startswith("test")
                for item in node.body
            ):
                testy.add(node.name)
    grown = True
    while grown:  # subclasses of test classes, and the classes those build on
        grown = False
        for name, found in classes.items():
            for _, node in found:
                more = ({name} if bases(node) & testy else set()) | (
                    bases(node) & set(classes) if name in testy else set()
                )
                if more - testy:
                    testy |= more
                    grown = True
    for name, found in sorted(classes.items()):
        if name in testy:
            yield from found


class TestDocstringTests(SynchronousTestCase):
    """Each test class says what it covers (issue 13), checked with C{ast}."""

    def test_every_test_class_has_a_docstring(self) -> None:
        missing = [
            f"{os.path.relpath(path, TESTS)}:{node.lineno} {node.name}"
            for path, node in _test_classes()
            if not ast.get_docstring(node)
        ]
        self.assertEqual(missing, [])

    def test_the_rule_sees_the_test_classes(self) -> None:
        names = {node.name for _, node in _test_classes()}
        # Direct TestCases, subclasses of test bases, contract mixins.
        for name in ("ArchitectureTests", "AuthTests", "SessionTestCase", "StateContract"):
            self.assertIn(name, names)
        self.assertNotIn("Harness", names)
