"""Alembic environment: runs on the connection that serving.migrations passes in, inside its transaction (and,
on PostgreSQL, its advisory lock). The target metadata is serving.records' models, for autogenerate."""
from __future__ import annotations

from alembic import context
from sqlalchemy import TypeDecorator

from serving.records import Base


def render_item(type_: str, obj, autogen_context):
    """Autogenerate writes a model's TypeDecorator (e.g. UTCDateTime) as its portable impl, so that revisions
    never import serving.records."""
    if type_ == "type" and isinstance(obj, TypeDecorator):
        return f"sa.{obj.impl!r}"
    return False


connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("run migrations through serving.migrations.upgrade(engine), or put an open connection in "
                       "alembic_config(connection); offline (--sql) mode is not supported")
context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True, render_item=render_item,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
