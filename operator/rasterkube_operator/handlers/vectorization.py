"""kopf handlers for Vectorization resources: the shared level-triggered reconcile (handlers.common).

Kind-specific hooks (extra watches, clean-up of shared deployments) belong here."""

from rasterkube.constants import Kind

KIND = Kind.VECTORIZATION
