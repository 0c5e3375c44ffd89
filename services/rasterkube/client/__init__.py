"""The rasterkube Python client: ``rasterkube.Client`` (see :mod:`rasterkube.client.core`)."""

from rasterkube.client.core import Client, parse_kind
from rasterkube.client.results import Result
from rasterkube.errors import ResourceFailed, ResourceNotFound, UserError, WaitTimeout

__all__ = ["Client", "ResourceFailed", "ResourceNotFound", "Result", "UserError", "WaitTimeout", "parse_kind"]
