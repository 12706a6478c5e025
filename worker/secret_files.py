"""Settings read from files, the way container platforms hand out secrets.

- ``RELAY_X_FILE=/path``: the setting ``RELAY_X`` is the content of that file (Docker
  secrets, a Kubernetes Secret mounted as files). Any setting, nested ones included
  (``RELAY_TENANTS__ACME__ESET__PASSWORD_FILE``), as long as ``RELAY_X_FILE`` is not a
  setting itself; setting both ``RELAY_X`` and ``RELAY_X_FILE`` is an error.
- ``RELAY_SECRETS_DIR=/dir``: each file of that directory named like a setting
  (``RELAY_BROKER_URL``, ``RELAY_TENANTS__ACME__ESET__PASSWORD``) is that setting:
  pydantic-settings' :class:`~pydantic_settings.NestedSecretsSettingsSource`, with the
  ``__`` of the environment for nesting. Hidden entries (a Kubernetes mount's ``..data``)
  are skipped.

A file's surrounding whitespace (its last newline) is dropped, as pydantic-settings does.
Environment variables win over files, ``*_FILE`` variables over the directory. A file that
can not be read is a :class:`SettingsFileError` naming the variable, never its content.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsError,
)

FILE_SUFFIX = "_FILE"
SECRETS_DIR_VARIABLE = "RELAY_SECRETS_DIR"
MAX_FILE_BYTES = 1024 * 1024  # a setting is short; /dev/zero is not read to the end


class SettingsFileError(SettingsError):
    """A setting's file (or the secrets directory) can not be used: which variable, what
    is wrong and the fix, without the file's content."""

    def __init__(self, name: str, problem: str, fix: str) -> None:
        super().__init__(f"{name}: {problem}; {fix}")
        self.name = name
        self.problem = problem
        self.fix = fix


def file_variable_target(name: str, settings_cls: type[BaseSettings]) -> str | None:
    """The setting a ``*_FILE`` variable gives (``RELAY_BROKER_URL`` for
    ``RELAY_BROKER_URL_FILE``), in upper case; None when ``name`` is not one (it is a
    setting itself, or the name without the suffix is not a setting)."""
    upper = name.upper()
    prefix = str(settings_cls.model_config.get("env_prefix", "")).upper()
    if not upper.startswith(prefix) or not upper.endswith(FILE_SUFFIX):
        return None
    target = upper.removesuffix(FILE_SUFFIX)
    if target == SECRETS_DIR_VARIABLE:  # read before any file is: not from one
        return None
    if names_setting(upper, settings_cls) or not names_setting(target, settings_cls):
        return None
    return target


def names_setting(name: str, settings_cls: type[BaseSettings]) -> bool:
    """Whether environment variable ``name`` sets something: a field of the settings,
    then of the models and maps below it (``RELAY_TENANTS__ACME__ESET__PASSWORD``)."""
    config = settings_cls.model_config
    prefix = str(config.get("env_prefix", "")).lower()
    delimiter = config.get("env_nested_delimiter") or None
    lowered = name.lower()
    if not lowered.startswith(prefix):
        return False
    annotation: Any = settings_cls
    for part in lowered.removeprefix(prefix).split(delimiter):
        annotation = _inner(annotation, part)
        if annotation is None:
            return False
    return True


def _inner(annotation: Any, key: str) -> Any:
    """The type found at ``key`` inside ``annotation``: a model's field, a map's value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(key)
        return None if field is None else field.annotation
    origin = get_origin(annotation)
    if isinstance(origin, type) and issubclass(origin, Mapping):
        return get_args(annotation)[-1]
    for argument in get_args(annotation):  # X | None, Annotated[X, …]
        found = _inner(argument, key)
        if found is not None:
            return found
    return None


class FileVariablesSource(EnvSettingsSource):
    """The settings of ``RELAY_X_FILE`` variables, read from their files and then parsed
    exactly as the environment's ``RELAY_X`` would be (nesting, JSON values)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = {name.upper(): value for name, value in os.environ.items()}
        found: dict[str, str | None] = {}  # by the name the environment would use
        for name, path in sorted(environ.items()):
            target = file_variable_target(name, self.settings_cls)
            if target is None:
                continue
            if target in environ:
                raise SettingsFileError(
                    name, f"{target} is set too", f"set either {target} or {name}, not both"
                )
            found[target if self.case_sensitive else target.lower()] = read_setting_file(
                name, path
            )
        return found

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def without_file_variables(
    env_settings: PydanticBaseSettingsSource, settings_cls: type[BaseSettings]
) -> PydanticBaseSettingsSource:
    """The environment's source without the ``*_FILE`` variables (which would be taken
    for unknown nested settings): :class:`FileVariablesSource` reads those."""
    if isinstance(env_settings, EnvSettingsSource):
        env_settings.env_vars = {
            name: value for name, value in env_settings.env_vars.items()
            if file_variable_target(name, settings_cls) is None
        }
    return env_settings


def read_setting_file(name: str, path: str) -> str:
    """The content of the file variable ``name`` names, stripped; SettingsFileError when
    it can not be read as UTF-8 text."""
    fix = f"mount the file there or point {name} at it"
    if not path:
        raise SettingsFileError(name, "names no file", fix)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise SettingsFileError(
            name, f"{path} can not be read ({error.strerror or type(error).__name__})", fix
        ) from None
    if len(data) > MAX_FILE_BYTES:
        raise SettingsFileError(
            name, f"{path} is larger than {MAX_FILE_BYTES} bytes", "point it at the setting's file"
        )
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SettingsFileError(name, f"{path} is not UTF-8 text", fix) from None


def secrets_directory_source(
    settings_cls: type[BaseSettings], file_secret_settings: PydanticBaseSettingsSource
) -> PydanticBaseSettingsSource | None:
    """pydantic-settings' nested secrets source over ``RELAY_SECRETS_DIR`` (or the
    ``_secrets_dir`` the settings were made with); None when neither names one."""
    directory = getattr(file_secret_settings, "secrets_dir", None) or _environ(
        SECRETS_DIR_VARIABLE
    )
    if not directory:
        return None
    try:
        return NestedSecretsSettingsSource(
            file_secret_settings, secrets_dir=directory, secrets_dir_missing="error"
        )
    except (SettingsError, OSError, UnicodeDecodeError) as error:
        problem = (
            str(error) if isinstance(error, SettingsError)
            else "a file in it is not UTF-8 text" if isinstance(error, UnicodeDecodeError)
            else f"a file in it can not be read ({error.strerror or type(error).__name__})"
        )
        raise SettingsFileError(
            SECRETS_DIR_VARIABLE, problem, "point it at the directory the secrets are mounted in"
        ) from None


def _environ(name: str) -> str | None:
    """An environment variable, whatever the case of its name (as settings are read)."""
    return next((value for key, value in os.environ.items() if key.upper() == name), None)
