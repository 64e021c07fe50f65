#!/usr/bin/env python3
"""Generate the vLLM patch series (file mode) from the overlay modules.

One source of truth: every module in ``<package>.MODULES`` (default package
``vllm_overlay``) with a non-None ``VLLM_TARGET`` becomes one patch
``NNNN-<module>.patch`` in ``patches/`` (quilt style, listed in
``patches/series`` in MODULES order).  A patch adds ``VLLM_TARGET`` (the
module's source, imports of sibling overlay modules rewritten to their
targets) and appends an activation block to every file in ``VLLM_HOOKS``.
``patches/patched.lock`` records the sha256 of every touched file after the
whole series; ``apply.py`` uses it for status and verification.

The package is read statically (``ast``), never imported: importing it would
install the overlay into vLLM.  ``MODULES``, ``__version__``, ``VLLM_TARGET``
and ``VLLM_HOOKS`` must therefore be literal assignments.

Pristine vLLM content comes from the installed vLLM 0.8.5.post1 (or
``--vllm-path``) and is verified against the sha256 values in its RECORD.
Output is deterministic: ``Last-Update`` is kept from the existing patch when
nothing else in it changed, otherwise it is today's date (UTC, or
SOURCE_DATE_EPOCH).

  python tools/make_patches.py            # (re)generate patches/
  python tools/make_patches.py --check    # exit 1 if patches/ is stale
"""
import argparse
import ast
import datetime
import difflib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import apply as _apply  # noqa: E402  (shared RECORD/hash/marker helpers)

VLLM_VERSION = "0.8.5.post1"
FORWARDED = "not-needed (upstream has its own design: RFC #16220)"
PATCH_NAME_RE = re.compile(r"^\d{4}-.+\.patch$")


class GenError(Exception):
    pass


# --------------------------------------------------------------------------
# reading the package statically
# --------------------------------------------------------------------------

def _literal_assignments(tree: ast.Module, path: Path, names):
    """Top-level literal assignments ``NAME = <literal>`` for ``names``."""
    found = {}
    for node in tree.body:
        targets, value = [], None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        for t in targets:
            if isinstance(t, ast.Name) and t.id in names:
                try:
                    found[t.id] = ast.literal_eval(value)
                except ValueError:
                    raise GenError(f"{path}:{node.lineno}: {t.id} must be a "
                                   "literal (the package is read without "
                                   "importing it)") from None
    return found


@dataclass
class Module:
    dotted: str        # vllm_overlay.attn_fusion
    rel: str           # attn_fusion
    path: Path
    source: bytes
    tree: ast.Module
    target: str        # vllm/compilation/attn_fusion.py or None
    hooks: tuple

    @property
    def target_dotted(self):
        return self.target[:-len(".py")].replace("/", ".")

    @property
    def ident(self):
        return self.rel.replace(".", "_")

    def description(self):
        doc = ast.get_docstring(self.tree, clean=True)
        if not doc or not doc.strip():
            raise GenError(f"{self.path}: a module docstring is required "
                           "(its first paragraph is the patch Description)")
        para = doc.strip().split("\n\n")[0]
        return [line.rstrip() for line in para.splitlines()]


@dataclass
class Package:
    name: str
    dir: Path
    version: str
    modules: list      # Module, in MODULES order
    by_dotted: dict


def _module_file(pkg_dir: Path, pkg: str, dotted: str) -> Path:
    parts = dotted.split(".")[1:]
    f = pkg_dir.joinpath(*parts).with_suffix(".py")
    if f.is_file():
        return f
    if pkg_dir.joinpath(*parts, "__init__.py").is_file():
        raise GenError(f"{dotted} is a package; VLLM_TARGET modules must be "
                       "single files")
    return None


def load_package(name: str) -> Package:
    if "." in name:
        raise GenError(f"--package must be a top-level package, not {name}")
    spec = importlib.util.find_spec(name)  # top level: nothing is executed
    if spec is None or not spec.submodule_search_locations:
        raise GenError(f"package {name!r} not found on sys.path")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    init = pkg_dir / "__init__.py"
    tree = ast.parse(init.read_bytes(), str(init))
    top = _literal_assignments(
        tree, init, {"MODULES", "__version__", "SUPPORTED_VLLM_VERSIONS"})
    if "MODULES" not in top:
        raise GenError(f"{init}: no literal MODULES list")
    if "__version__" not in top:
        top["__version__"] = _imported_literal(name, pkg_dir, tree, init,
                                               "__version__")
    supported = top.get("SUPPORTED_VLLM_VERSIONS")
    if supported is not None and VLLM_VERSION not in supported:
        raise GenError(f"{init}: SUPPORTED_VLLM_VERSIONS {supported} lacks "
                       f"{VLLM_VERSION}, the version this series targets")
    modules, by_dotted, targets = [], {}, {}
    for dotted in top["MODULES"]:
        if not dotted.startswith(name + ".") or dotted in by_dotted:
            raise GenError(f"{init}: bad or duplicate MODULES entry "
                           f"{dotted!r}")
        path = _module_file(pkg_dir, name, dotted)
        if path is None:
            raise GenError(f"{dotted} (listed in {name}.MODULES) does not "
                           f"exist in {pkg_dir}")
        source = path.read_bytes()
        mtree = ast.parse(source, str(path))
        vals = _literal_assignments(mtree, path, {"VLLM_TARGET", "VLLM_HOOKS"})
        # Like vllm_overlay.is_patched_vllm(): absent means None / ().
        target = vals.get("VLLM_TARGET")
        hooks = tuple(vals.get("VLLM_HOOKS", ()))
        if hooks and not any(isinstance(n, ast.FunctionDef)
                             and n.name == "install" for n in mtree.body):
            raise GenError(f"{path}: VLLM_HOOKS given but no top-level "
                           "`def install()` for the hooks to call")
        if target is None:
            if hooks:
                raise GenError(f"{path}: VLLM_HOOKS without VLLM_TARGET: the "
                               "hook would have nothing to import")
        else:
            _check_vllm_path(path, "VLLM_TARGET", target)
            if target in targets:
                raise GenError(f"{path}: VLLM_TARGET {target} is also the "
                               f"target of {targets[target]}")
            targets[target] = dotted
        for h in hooks:
            _check_vllm_path(path, "VLLM_HOOKS", h)
        if len(set(hooks)) != len(hooks) or target in hooks:
            raise GenError(f"{path}: VLLM_HOOKS repeats a file or names the "
                           "module's own target")
        m = Module(dotted, dotted[len(name) + 1:], path, source, mtree,
                   target, hooks)
        modules.append(m)
        by_dotted[dotted] = m
    return Package(name, pkg_dir, str(top.get("__version__", "0")), modules,
                   by_dotted)


def _imported_literal(pkg_name, pkg_dir, tree, path, name):
    """Value of ``name`` bound in ``tree`` by ``from <pkg>.<m> import X as
    name`` where ``X`` is a literal in module ``m`` (read statically)."""
    for node in tree.body:
        if not isinstance(node, ast.ImportFrom) or node.level:
            continue
        for a in node.names:
            if (a.asname or a.name) != name:
                continue
            mod = node.module or ""
            f = (_module_file(pkg_dir, pkg_name, mod)
                 if mod.startswith(pkg_name + ".") else None)
            if f is not None:
                vals = _literal_assignments(ast.parse(f.read_bytes(), str(f)),
                                            f, {a.name})
                if a.name in vals:
                    return vals[a.name]
    raise GenError(f"{path}: {name} must be a literal, or imported from a "
                   "package module that assigns it a literal")


def _check_vllm_path(where, key, p):
    pp = PurePosixPath(p) if isinstance(p, str) else None
    if (pp is None or pp.is_absolute() or ".." in pp.parts
            or pp.parts[0] != "vllm" or pp.suffix != ".py" or str(pp) != p):
        raise GenError(f"{where}: {key} entry {p!r} must be a normalized path "
                       "like 'vllm/compilation/x.py'")


# --------------------------------------------------------------------------
# import rewriting
# --------------------------------------------------------------------------

def _line_offsets(src: bytes):
    offs, pos = [0], 0
    for line in src.splitlines(keepends=True):
        pos += len(line)
        offs.append(pos)
    return offs


def rewrite_imports(pkg: Package, mod: Module) -> bytes:
    """The module's source with overlay imports pointing at vLLM targets.

    Supported: ``from P.m import x``, ``import P.m as y``, ``from P import m
    [as y]`` and the relative forms ``from .m import x``, ``from . import m``.
    Refused (GenError): importing the root package ``P`` itself or one of its
    attributes, an overlay module without a VLLM_TARGET, and ``import P.m``
    without ``as`` (it binds ``P``, which does not exist in file mode).
    """
    src = mod.source
    offs = _line_offsets(src)
    where = lambda n: f"{mod.path}:{n.lineno}"  # noqa: E731

    def off(lineno, col):
        return offs[lineno - 1] + col

    def target_of(dotted, node, what):
        if dotted == pkg.name:
            raise GenError(f"{where(node)}: {what} imports the root package "
                           f"{pkg.name}; import the feature module instead "
                           "(the root package does not exist in file mode)")
        m = pkg.by_dotted.get(dotted)
        if m is None:
            raise GenError(f"{where(node)}: {what} imports {dotted}, which is "
                           f"not listed in {pkg.name}.MODULES (no VLLM_TARGET)")
        if m.target is None:
            raise GenError(f"{where(node)}: {what} imports {dotted}, an "
                           "overlay-only module (VLLM_TARGET = None); it does "
                           "not exist in file mode")
        return m.target_dotted

    def is_ours(dotted):
        return dotted == pkg.name or dotted.startswith(pkg.name + ".")

    mod_pkg = mod.dotted.rsplit(".", 1)[0]
    edits = []  # (start, end, replacement bytes)
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if not is_ours(a.name):
                    continue
                if a.name == pkg.name:
                    target_of(a.name, node, "`import`")
                if a.asname is None:
                    raise GenError(
                        f"{where(node)}: `import {a.name}` binds the name "
                        f"{pkg.name}; write `import {a.name} as "
                        f"{a.name.rsplit('.', 1)[1]}`")
                new = target_of(a.name, node, "`import`")
                edits.append((off(a.lineno, a.col_offset),
                              off(a.end_lineno, a.end_col_offset),
                              f"{new} as {a.asname}".encode()))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod_pkg.split(".")
                if node.level > len(base):
                    raise GenError(f"{where(node)}: relative import beyond "
                                   f"the {pkg.name} package")
                base = base[:len(base) - node.level + 1]
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module
            if not is_ours(full):
                continue
            start = off(node.lineno, node.col_offset)
            end = off(node.end_lineno, node.end_col_offset)
            stmt = src[start:end]
            kw = re.match(rb"from\b(?:[\s.\w]|\\\r?\n)*?\bimport\b", stmt)
            if kw is None:
                raise GenError(f"{where(node)}: cannot parse this import")
            if full != pkg.name:
                new = target_of(full, node, "`from ... import`")
                edits.append((start, start + kw.end(),
                              f"from {new} import".encode()))
                continue
            # from P import m [as y], ...: every name must be a module.
            names = []
            for a in node.names:
                if a.name == "*":
                    target_of(pkg.name, node, "`from ... import *`")
                dotted = f"{pkg.name}.{a.name}"
                if dotted not in pkg.by_dotted and not _module_file(
                        pkg.dir, pkg.name, dotted):
                    target_of(pkg.name, node, f"`from {pkg.name} import "
                              f"{a.name}`")
                names.append((a, target_of(dotted, node, "`from ... import`")))
            parents = {t.rsplit(".", 1)[0] for _, t in names}
            if len(parents) == 1:
                edits.append((start, start + kw.end(),
                              f"from {parents.pop()} import".encode()))
                for a, t in names:
                    leaf = t.rsplit(".", 1)[1]
                    bound = a.asname or a.name
                    text = leaf if leaf == bound else f"{leaf} as {bound}"
                    edits.append((off(a.lineno, a.col_offset),
                                  off(a.end_lineno, a.end_col_offset),
                                  text.encode()))
            else:
                text = "; ".join(f"import {t} as {a.asname or a.name}"
                                 for a, t in names)
                edits.append((start, end, text.encode()))
    for node in ast.walk(mod.tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and node.value in pkg.by_dotted):
            print(f"make_patches.py: warning: {mod.path}:{node.lineno}: "
                  f"string {node.value!r} names an overlay module; it is not "
                  "rewritten for file mode", file=sys.stderr)
    out = bytearray(src)
    for s, e, r in sorted(edits, reverse=True):
        out[s:e] = r
    out = bytes(out)
    try:
        new_tree = ast.parse(out, f"{mod.target} (rewritten)")
    except SyntaxError as e:
        raise GenError(f"{mod.path}: rewriting imports broke the source: "
                       f"{e}") from None
    for node in ast.walk(new_tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if not node.level else [pkg.name]
        if any(is_ours(n) for n in names):
            raise GenError(f"{mod.path}:{node.lineno}: an import of "
                           f"{pkg.name} survived rewriting")
    return out


def hook_block(mod: Module) -> bytes:
    alias = f"_vllm_overlay_install_{mod.ident}"
    return ("\n"
            + _apply.HOOK_MARKER.format(module=mod.rel) + "\n"
            + f"from {mod.target_dotted} import install as {alias}"
            + "  # noqa: E402\n"
            + f"{alias}()\n").encode()


# --------------------------------------------------------------------------
# diffs
# --------------------------------------------------------------------------

def _range(start, length):
    # unified diff hunk range, git/GNU conventions
    if length == 1:
        return f"{start + 1}"
    if length == 0:
        return f"{start},0"
    return f"{start + 1},{length}"


def _emit(prefix, line):
    if line.endswith("\n"):
        return prefix + line
    return prefix + line + "\n\\ No newline at end of file\n"


def file_diff(rel: str, old, new: bytes) -> str:
    a = old.decode("utf-8", "surrogateescape").splitlines(keepends=True) \
        if old is not None else []
    b = new.decode("utf-8", "surrogateescape").splitlines(keepends=True)
    out = [f"diff --git a/{rel} b/{rel}\n"]
    if old is None:
        out += ["new file mode 100644\n", "--- /dev/null\n"]
    else:
        out.append(f"--- a/{rel}\n")
    out.append(f"+++ b/{rel}\n")
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    groups = list(sm.get_grouped_opcodes(3))
    if not groups:
        raise GenError(f"no change to {rel}")
    for group in groups:
        i1, i2 = group[0][1], group[-1][2]
        j1, j2 = group[0][3], group[-1][4]
        out.append(f"@@ -{_range(i1, i2 - i1)} +{_range(j1, j2 - j1)} @@\n")
        for tag, x1, x2, y1, y2 in group:
            if tag == "equal":
                out += [_emit(" ", line) for line in a[x1:x2]]
                continue
            out += [_emit("-", line) for line in a[x1:x2]]
            out += [_emit("+", line) for line in b[y1:y2]]
    return "".join(out)


# --------------------------------------------------------------------------
# the series
# --------------------------------------------------------------------------

def _today():
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
         if epoch else datetime.datetime.now(datetime.timezone.utc))
    return t.strftime("%Y-%m-%d")


def _header(pkg: Package, mod: Module, date: str) -> str:
    desc = mod.description()
    lines = [f"Description: {desc[0]}"]
    lines += [f" {line}" if line else " ." for line in desc[1:]]
    lines += [
        f"Origin: {pkg.name} {pkg.version}, module {mod.dotted}",
        f"Forwarded: {FORWARDED}",
        f"Applies-To: vllm {VLLM_VERSION}",
        f"Last-Update: {date}",
        "---",
    ]
    return "\n".join(lines) + "\n"


_DATE_RE = re.compile(r"^Last-Update: (\S+)$", re.M)


def generate(pkg: Package, dist, existing: dict):
    """Return {file name: bytes} for series, patches and patched.lock.

    ``existing`` maps names to the bytes now in the output dir (for keeping
    Last-Update when a patch is otherwise unchanged).
    """
    content = {}  # rel -> current bytes (pristine, then progressively patched)

    def current(rel, mod):
        if rel in content:  # pristine already read, or added earlier
            return content[rel]
        if rel not in dist.record or not dist.record[rel]:
            raise GenError(f"{mod.path}: VLLM_HOOKS names {rel}, which is "
                           f"neither a vLLM {VLLM_VERSION} file nor added by "
                           "an earlier patch of the series")
        data = _apply.read_file(dist.site, rel)
        if data is None or _apply.sha256_b64(data) != dist.record[rel]:
            raise GenError(
                f"{dist.site / rel} is not pristine (sha256 differs from "
                f"{dist.dist_info.name}/RECORD); generate against a pristine "
                f"vLLM {VLLM_VERSION}: run `python apply.py --revert` or "
                f"`pip install --force-reinstall --no-deps "
                f"vllm=={VLLM_VERSION}`")
        return data

    files, series_names = {}, []
    n = 0
    for mod in pkg.modules:
        if mod.target is None:
            continue
        n += 1
        name = f"{n:04d}-{mod.rel.replace('.', '-')}.patch"
        if mod.target in dist.record or (dist.site / mod.target).exists():
            raise GenError(f"{mod.path}: VLLM_TARGET {mod.target} already "
                           f"exists in {dist.site}; the series only adds "
                           "files (if the series is applied there, run "
                           "`python apply.py --revert` first)")
        diffs = []
        new_src = rewrite_imports(pkg, mod)
        diffs.append(file_diff(mod.target, None, new_src))
        content[mod.target] = new_src
        block = hook_block(mod)
        for rel in mod.hooks:
            old = current(rel, mod)
            sep = b"" if not old or old.endswith(b"\n") else b"\n"
            new = old + sep + block
            diffs.append(file_diff(rel, old, new))
            content[rel] = new
        body = "".join(diffs)
        date = None
        prev = existing.get(name)
        if prev is not None:
            prev_text = prev.decode("utf-8", "surrogateescape")
            m = _DATE_RE.search(prev_text)
            if m and _header(pkg, mod, m.group(1)) + body == prev_text:
                date = m.group(1)
        text = _header(pkg, mod, date or _today()) + body
        files[name] = text.encode("utf-8", "surrogateescape")
        series_names.append(name)
    if not series_names:
        raise GenError(f"no module of {pkg.name}.MODULES has a VLLM_TARGET")
    files["series"] = ("".join(
        [f"# generated by tools/make_patches.py from {pkg.name} "
         f"{pkg.version}; do not edit\n"] + [f"{s}\n" for s in series_names])
    ).encode()
    lock = {rel: _apply.sha256_hex(data) for rel, data in content.items()}
    files[_apply.LOCK_NAME] = (json.dumps(lock, indent=2, sort_keys=True)
                               + "\n").encode()
    return files


def _read_existing(out: Path):
    existing = {}
    if out.is_dir():
        for f in sorted(out.iterdir()):
            if f.is_file() and (PATCH_NAME_RE.match(f.name)
                                or f.name in ("series", _apply.LOCK_NAME)):
                existing[f.name] = f.read_bytes()
    return existing


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="make_patches.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", default="vllm_overlay",
                    help="overlay package to read (default: %(default)s; "
                    "found on sys.path, repo root first)")
    ap.add_argument("--out", default=str(REPO / "patches"),
                    help="output directory (default: %(default)s)")
    ap.add_argument("--vllm-path", metavar="DIR",
                    help="pristine vllm package dir (default: the installed "
                    "one, found without importing it)")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if the output directory "
                    "differs from what would be generated")
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        pkg = load_package(args.package)
        vllm_dir = _apply.locate_vllm(args.vllm_path)
        dist = _apply.read_dist(vllm_dir, want_version=VLLM_VERSION)
        existing = _read_existing(out)
        files = generate(pkg, dist, existing)
    except (GenError, _apply.Refused) as e:
        print(f"make_patches.py: error: {e}", file=sys.stderr)
        return 2
    stale = sorted(set(existing) - set(files))
    differ = sorted(n for n in files if existing.get(n) != files[n])
    if args.check:
        if stale or differ:
            print(f"make_patches.py: {out} is stale (regenerate with "
                  "`make patches`):", file=sys.stderr)
            for n in differ:
                what = "missing" if n not in existing else "differs"
                print(f"  {what}: {n}", file=sys.stderr)
            for n in stale:
                print(f"  not generated: {n}", file=sys.stderr)
            return 1
        print(f"{out}: up to date ({len(files) - 2} patches)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for n in differ:
        (out / n).write_bytes(files[n])
    for n in stale:
        (out / n).unlink()
    print(f"{out}: {len(files) - 2} patches; {len(differ)} written, "
          f"{len(stale)} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
