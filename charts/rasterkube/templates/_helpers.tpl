{{/* Chart name. */}}
{{- define "rasterkube.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "rasterkube.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rasterkube.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable for the life of a release. */}}
{{- define "rasterkube.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rasterkube.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels. */}}
{{- define "rasterkube.labels" -}}
helm.sh/chart: {{ include "rasterkube.chart" . }}
{{ include "rasterkube.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rasterkube
{{- end }}

{{- define "rasterkube.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rasterkube.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "rasterkube.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Validate values; fails the render with a message that says what to change.
*/}}
{{- define "rasterkube.validate" -}}
{{- if not (has .Values.backend (list "ray" "kuberay")) }}
{{- fail (printf "backend must be \"ray\" or \"kuberay\", got %q" (toString .Values.backend)) }}
{{- end }}
{{- if and (eq .Values.backend "ray") (not .Values.ray.address) }}
{{- fail "backend=ray needs ray.address (the Ray Jobs API address, e.g. http://raycluster-head-svc:8265)" }}
{{- end }}
{{- if not .Values.storage.root }}
{{- fail "storage.root is required (e.g. s3://my-bucket/rasterkube)" }}
{{- end }}
{{- with .Values.storage.s3.credentialsSecret }}
{{- if and .name (or (not .accessKeyIdKey) (not .secretAccessKeyKey)) }}
{{- fail "storage.s3.credentialsSecret needs accessKeyIdKey and secretAccessKeyKey when name is set" }}
{{- end }}
{{- end }}
{{- range .Values.watchNamespaces }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" (toString .)) }}
{{- fail (printf "watchNamespaces: %q is not a valid namespace name" (toString .)) }}
{{- end }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled=true" }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if and (has .name (list "AWS_ACCESS_KEY_ID" "AWS_SECRET_ACCESS_KEY" "AWS_SESSION_TOKEN")) (hasKey . "value") }}
{{- fail (printf "extraEnv: %s must not be inlined; set storage.s3.credentialsSecret or use valueFrom.secretKeyRef" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
RBAC rules for the namespaced resources the operator touches. Shared by the ClusterRole
(all namespaces) and the per-namespace Roles (watchNamespaces).
*/}}
{{- define "rasterkube.namespacedRules" -}}
- apiGroups: ["rasterkube.dev"]
  resources: ["mosaics", "predictions", "changescores", "vectorizations"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["rasterkube.dev"]
  resources: ["mosaics/status", "predictions/status", "changescores/status", "vectorizations/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["rasterkube.dev"]
  resources: ["mosaics/finalizers", "predictions/finalizers", "changescores/finalizers", "vectorizations/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if eq .Values.backend "kuberay" }}
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["create", "get", "list", "watch", "delete", "patch"]
- apiGroups: ["ray.io"]
  resources: ["rayclusters"]
  verbs: ["get", "list", "watch"]
# Ray pods that cannot start (unschedulable, e.g. GPUs no node has) are reported on the resource.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list"]
{{- end }}
{{- end }}

{{/* kopf discovers the served resources by watching CRDs (cluster-scoped); the kuberay backend
reads the nodes' allocatable resources to tell a Ray pod that waits for capacity from one that no
node could ever take (e.g. GPUs where there are none). */}}
{{- define "rasterkube.crdRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- if eq .Values.backend "kuberay" }}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list"]
{{- end }}
{{- end }}
