"""Model configuration shared by every contract model."""

from pydantic import AliasChoices, AliasGenerator, BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


def _snake_or_camel(field_name: str) -> AliasChoices | str:
    # snake_case is canonical (and first, so JSON Schema shows it); the vendors'
    # camelCase spelling (objectUuids, taskUuid, expireTime) is accepted as well.
    camel = to_camel(field_name)
    return field_name if camel == field_name else AliasChoices(field_name, camel)


class ContractModel(BaseModel):
    """Frozen, strict about unknown fields, snake_case out, snake or camel in."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=AliasGenerator(validation_alias=_snake_or_camel),
        populate_by_name=True,
    )
