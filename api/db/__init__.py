"""Database access: the pool, the tenant mechanism, migrations, the embedded server."""

from api.db.pool import ControlConn, Database, rows_affected
from api.db.schemas import CONTROL_SCHEMA, checked_shop_schema, new_shop_schema_name
from api.db.tenant import Tenant, TenantConn, in_tenant, tenant_tx

__all__ = [
    "CONTROL_SCHEMA",
    "ControlConn",
    "Database",
    "Tenant",
    "TenantConn",
    "checked_shop_schema",
    "in_tenant",
    "new_shop_schema_name",
    "rows_affected",
    "tenant_tx",
]
