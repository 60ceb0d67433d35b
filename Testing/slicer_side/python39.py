"""What Python 3.9 (Slicer 5.8's Python) cannot load in a source file: its grammar, and the
3.10+ constructs that parse under 3.9 but fail when evaluated at import or call time.

:func:`problems` returns ``(line, text)`` pairs. Checked beyond the grammar:

- ``X | Y`` of types evaluated at run time (PEP 604, 3.10): outside annotations, and inside
  annotations that are evaluated (a module without ``from __future__ import annotations``:
  function signatures, and module- and class-level variable annotations). An operand counts as
  a type when it is ``None``, a builtin type, a typing name, a subscripted generic, or a
  CamelCase name; ``None | x`` counts whatever ``x`` is. Flags such as ``A_FLAG | B_FLAG`` or
  ``qt.Qt.AlignLeft | qt.Qt.AlignTop`` do not.
- Keyword arguments added in 3.10: ``zip(strict=)``, ``dataclass(slots=, kw_only=, match_args=)``,
  ``field(kw_only=)``; ``traceback.format_exception(exc)`` with the exception alone.
- Names added to the standard library in 3.10 or later, imported or reached as attributes
  (``typing.TypeAlias``, ``itertools.pairwise``, ``enum.StrEnum``, ``tomllib`` ...), and the
  builtins ``aiter``, ``anext``, ``EncodingWarning``, ``ExceptionGroup``, ``BaseExceptionGroup``.
"""

from __future__ import annotations

import ast
import builtins

NEW_NAMES = {  # module -> names added in Python 3.10 or later
    "typing": {"TypeAlias", "ParamSpec", "ParamSpecArgs", "ParamSpecKwargs", "Concatenate", "TypeGuard", "is_typeddict",
               "Self", "Never", "LiteralString", "Required", "NotRequired", "assert_never", "assert_type", "reveal_type",
               "Unpack", "TypeVarTuple", "dataclass_transform", "get_overloads", "clear_overloads", "override", "TypeIs",
               "ReadOnly", "TypeAliasType"},
    "itertools": {"pairwise", "batched"},
    "contextlib": {"aclosing", "chdir"},
    "enum": {"StrEnum", "ReprEnum", "EnumCheck", "FlagBoundary", "verify", "member", "nonmember", "global_enum",
             "property", "show_flag_values"},
    "datetime": {"UTC"},
    "dataclasses": {"KW_ONLY"},
    "asyncio": {"TaskGroup", "timeout", "timeout_at", "Runner", "Barrier"},
    "types": {"EllipsisType", "NoneType", "NotImplementedType", "UnionType"},
    "inspect": {"get_annotations"},
    "operator": {"call"},
    "os": {"EFD_CLOEXEC", "eventfd", "splice"},
}
NEW_MODULES = {"tomllib", "wsgiref.types"}
NEW_BUILTINS = {"aiter", "anext", "EncodingWarning", "ExceptionGroup", "BaseExceptionGroup"}
NEW_KEYWORDS = {"zip": {"strict"}, "dataclass": {"slots", "kw_only", "match_args"}, "field": {"kw_only"}}
TYPING_NAMES = {"Any", "Optional", "Union", "List", "Dict", "Tuple", "Set", "FrozenSet", "Type", "Callable", "Sequence",
                "Mapping", "Iterable", "Iterator", "Literal", "Annotated", "Protocol", "TypedDict"}
BUILTIN_TYPES = {name for name, value in vars(builtins).items() if isinstance(value, type)}


def problems(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    try:
        tree = ast.parse(source, filename=filename, feature_version=(3, 9))
    except SyntaxError as error:
        return [(error.lineno or 0, f"not Python 3.9 grammar: {error.msg}")]
    postponed = any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
                    and any(alias.name == "annotations" for alias in node.names) for node in tree.body)
    found = []
    skipped = set() if not postponed else {id(node) for node in _annotations(tree)}
    skipped |= {id(node) for node in _local_variable_annotations(tree)}
    for node in _walk_skipping(tree, skipped):
        found.extend(_check(node))
    return sorted(set(found))


def _annotations(tree):
    """Every annotation expression of the module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign):
            yield node.annotation
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            for argument in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg, arguments.kwarg]:
                if argument is not None and argument.annotation is not None:
                    yield argument.annotation
            if node.returns is not None:
                yield node.returns


def _local_variable_annotations(tree):
    """Annotations of variables inside functions: never evaluated (PEP 526)."""
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.AnnAssign) and node is not function:
                    yield node.annotation


def _walk_skipping(tree, skipped: set):
    todo = [tree]
    while todo:
        node = todo.pop()
        if id(node) in skipped:
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def _is_none(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _type_like(node) -> bool:
    if _is_none(node):
        return True
    if isinstance(node, ast.Name):
        name = node.id
        return name in BUILTIN_TYPES or name in TYPING_NAMES or (name[:1].isupper() and not name.isupper())
    if isinstance(node, ast.Subscript):
        return _type_like(node.value) or isinstance(node.value, ast.Attribute)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _type_like(node.left) and _type_like(node.right)
    return False


def _called_name(node: ast.Call) -> str:
    function = node.func
    return function.id if isinstance(function, ast.Name) else function.attr if isinstance(function, ast.Attribute) else ""


def _check(node) -> list[tuple[int, str]]:
    line = getattr(node, "lineno", 0)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = node.left, node.right
        if (_is_none(left) or _is_none(right)) or (_type_like(left) and _type_like(right)):
            return [(line, f"'{ast.unparse(node)}': a type union evaluated at run time needs Python 3.10")]
    elif isinstance(node, ast.Call):
        name = _called_name(node)
        new = {k.arg for k in node.keywords if k.arg} & NEW_KEYWORDS.get(name, set())
        if new:
            return [(line, f"{name}({', '.join(sorted(new))}=...) needs Python 3.10")]
        if name == "format_exception" and len(node.args) == 1 and not node.keywords:
            return [(line, "traceback.format_exception(exc) with the exception alone needs Python 3.10")]
    elif isinstance(node, ast.ImportFrom):
        new = {alias.name for alias in node.names} & NEW_NAMES.get(node.module or "", set())
        if new or node.module in NEW_MODULES:
            return [(line, f"from {node.module} import {', '.join(sorted(new)) or '...'}: added after Python 3.9")]
    elif isinstance(node, ast.Import):
        new = [alias.name for alias in node.names if alias.name in NEW_MODULES]
        if new:
            return [(line, f"import {', '.join(new)}: added after Python 3.9")]
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        if node.attr in NEW_NAMES.get(node.value.id, set()):
            return [(line, f"{node.value.id}.{node.attr}: added after Python 3.9")]
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in NEW_BUILTINS:
        return [(line, f"{node.id}: a builtin added after Python 3.9")]
    return []
