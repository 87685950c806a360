"""pydantic-core's validator without pydantic_core/__init__.py: that imports core_schema, whose
helpers only build plain dicts but whose typed definitions cost 20-30 ms to import on every
CNI call. `cs` builds the same dicts for the schema shapes the configuration uses, under the
same names, and the validator and its error come straight from the compiled module."""

from __future__ import annotations

from .lazy import without_package_init

without_package_init("pydantic_core")
from pydantic_core._pydantic_core import SchemaValidator, ValidationError  # noqa: E402

__all__ = ["SchemaValidator", "ValidationError", "cs"]


def shape(kind: str, **keys) -> dict:
    """A schema dict of pydantic-core's format: its type and the keys that are set."""
    return {"type": kind, **{key: value for key, value in keys.items() if value is not None}}


class CoreSchema:
    """The helpers of pydantic_core.core_schema the plugin uses, returning the same dicts."""

    @staticmethod
    def str_schema(pattern: str | None = None, min_length: int | None = None) -> dict:
        return shape("str", pattern=pattern, min_length=min_length)

    @staticmethod
    def int_schema(ge: int | None = None, le: int | None = None, strict: bool | None = None) -> dict:
        return shape("int", ge=ge, le=le, strict=strict)

    @staticmethod
    def bool_schema() -> dict:
        return shape("bool")

    @staticmethod
    def float_schema(ge: float | None = None, le: float | None = None,
                     strict: bool | None = None) -> dict:
        return shape("float", ge=ge, le=le, strict=strict)

    @staticmethod
    def literal_schema(expected: list) -> dict:
        return shape("literal", expected=expected)

    @staticmethod
    def list_schema(items_schema: dict | None = None, min_length: int | None = None,
                    max_length: int | None = None) -> dict:
        return shape("list", items_schema=items_schema, min_length=min_length, max_length=max_length)

    @staticmethod
    def dict_schema(keys_schema: dict | None = None, values_schema: dict | None = None) -> dict:
        return shape("dict", keys_schema=keys_schema, values_schema=values_schema)

    @staticmethod
    def nullable_schema(schema: dict) -> dict:
        return shape("nullable", schema=schema)

    @staticmethod
    def union_schema(choices: list, custom_error_type: str | None = None,
                     custom_error_message: str | None = None) -> dict:
        return shape("union", choices=choices, custom_error_type=custom_error_type,
                     custom_error_message=custom_error_message)

    @staticmethod
    def typed_dict_schema(fields: dict, extra_behavior: str | None = None) -> dict:
        return shape("typed-dict", fields=fields, extra_behavior=extra_behavior)

    @staticmethod
    def typed_dict_field(schema: dict, required: bool | None = None) -> dict:
        return shape("typed-dict-field", schema=schema, required=required)

    @staticmethod
    def with_default_schema(schema: dict, default=None, default_factory=None,
                            validate_default: bool | None = None) -> dict:
        out = shape("default", schema=schema, default_factory=default_factory,
                    validate_default=validate_default)
        if default_factory is None:
            out["default"] = default
        return out


cs = CoreSchema()
