{{/*
Chart name, truncated to 63 characters.
*/}}
{{- define "bloom.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart> (or the release name when it already contains the chart
name). Component suffixes are at most 11 characters, so truncate to 52.
*/}}
{{- define "bloom.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "bloom.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels. Call with (dict "ctx" $ "component" "api").
*/}}
{{- define "bloom.labels" -}}
helm.sh/chart: {{ include "bloom.chart" .ctx }}
{{ include "bloom.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: bloom-runtime
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels. Call with (dict "ctx" $ "component" "api").
*/}}
{{- define "bloom.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bloom.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/*
ServiceAccount of the api, reconciler and worker pods.
*/}}
{{- define "bloom.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "bloom.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
ServiceAccount of the hook Jobs: the chart's own ServiceAccount is a regular release
resource and does not exist yet when pre-install hooks run.
*/}}
{{- define "bloom.hookServiceAccountName" -}}
{{- if .Values.hooks.serviceAccountName }}
{{- .Values.hooks.serviceAccountName }}
{{- else if and (not .Values.serviceAccount.create) .Values.serviceAccount.name }}
{{- .Values.serviceAccount.name }}
{{- else }}
{{- "default" }}
{{- end }}
{{- end }}

{{/*
Image reference. Call with (dict "ctx" $ "image" <optional override with repository/tag>).
*/}}
{{- define "bloom.image" -}}
{{- $img := .ctx.Values.image }}
{{- $repo := $img.repository }}
{{- $tag := default .ctx.Chart.AppVersion $img.tag }}
{{- $digest := $img.digest }}
{{- with .image }}
{{- if .repository }}
{{- $repo = .repository }}
{{- $digest = "" }}
{{- end }}
{{- if .tag }}
{{- $tag = .tag }}
{{- $digest = "" }}
{{- end }}
{{- end }}
{{- if $digest }}
{{- printf "%s@%s" $repo $digest }}
{{- else }}
{{- printf "%s:%s" $repo (toString $tag) }}
{{- end }}
{{- end }}

{{/*
Name of the Secret read by the api, reconciler and worker pods.
*/}}
{{- define "bloom.secretName" -}}
{{- default (include "bloom.fullname" .) .Values.existingSecret }}
{{- end }}

{{/*
Name of the Secret read by the hook Jobs: the existing Secret, or the hook copy.
*/}}
{{- define "bloom.hookSecretName" -}}
{{- if .Values.existingSecret }}
{{- .Values.existingSecret }}
{{- else }}
{{- printf "%s-hooks" (include "bloom.fullname" .) }}
{{- end }}
{{- end }}

{{/*
An env var from the Secret. Call with (dict "ctx" $ "name" "DATABASE_URL" "secret" <name> "optional" bool).
*/}}
{{- define "bloom.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .name }}
      {{- if .optional }}
      optional: true
      {{- end }}
{{- end }}

{{/*
DATABASE_URL: from database.existingSecret, else from the given Secret.
Call with (dict "ctx" $ "secret" <Secret name>).
*/}}
{{- define "bloom.env.databaseUrl" -}}
{{- $db := .ctx.Values.database -}}
{{- if $db.existingSecret -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $db.existingSecret }}
      key: {{ $db.existingSecretKey }}
{{- else -}}
{{ include "bloom.secretEnv" (dict "name" "DATABASE_URL" "secret" .secret) }}
{{- end }}
{{- end }}

{{/*
True when the chart renders the hook Secret: no existingSecret, and a hook needs a
value that only the chart's Secret would hold.
*/}}
{{- define "bloom.needsHookSecret" -}}
{{- $v := .Values }}
{{- if not $v.existingSecret }}
{{- if or (and $v.hooks.migrate.enabled (not $v.database.existingSecret)) (and $v.hooks.natsApply.enabled $v.nats.urlFromSecret) }}true{{- end }}
{{- end }}
{{- end }}

{{/*
True ("true") when the Secret holds the key: always for an existing Secret's optional
keys (referenced with optional: true), else only when the chart stores a value.
*/}}
{{- define "bloom.hasSecretKey" -}}
{{- if .ctx.Values.existingSecret }}true{{- else if .value }}true{{- end }}
{{- end }}

{{/*
Secret data of the chart's Secret (key: value, not yet encoded), as YAML.
*/}}
{{- define "bloom.secretData" -}}
{{- $v := .Values }}
{{- $d := dict }}
{{- if not $v.database.existingSecret }}{{- $_ := set $d "DATABASE_URL" $v.database.url }}{{- end }}
{{- if $v.nats.urlFromSecret }}{{- $_ := set $d "NATS_URL" $v.nats.url }}{{- end }}
{{- if $v.api.apiKey }}{{- $_ := set $d "RUNTIME_API_KEY" $v.api.apiKey }}{{- end }}
{{- if $v.membridge.adminKey }}{{- $_ := set $d "MEMBRIDGE_ADMIN_KEY" $v.membridge.adminKey }}{{- end }}
{{- if $v.membridge.agentKey }}{{- $_ := set $d "MEMBRIDGE_AGENT_KEY" $v.membridge.agentKey }}{{- end }}
{{- if $v.s3.accessKeyId }}{{- $_ := set $d "AWS_ACCESS_KEY_ID" $v.s3.accessKeyId }}{{- end }}
{{- if $v.s3.secretAccessKey }}{{- $_ := set $d "AWS_SECRET_ACCESS_KEY" $v.s3.secretAccessKey }}{{- end }}
{{- if $v.s3.minio.accessKey }}{{- $_ := set $d "MINIO_ACCESS_KEY" $v.s3.minio.accessKey }}{{- end }}
{{- if $v.s3.minio.secretKey }}{{- $_ := set $d "MINIO_SECRET_KEY" $v.s3.minio.secretKey }}{{- end }}
{{- toYaml $d }}
{{- end }}

{{/*
Checks of value combinations that the schema cannot express.
*/}}
{{- define "bloom.validate" -}}
{{- $v := .Values }}
{{- if and (not $v.existingSecret) (not $v.database.existingSecret) (not $v.database.url) }}
{{- fail "database.url is required (or set database.existingSecret, or existingSecret to a Secret holding DATABASE_URL)" }}
{{- end }}
{{- if and (eq $v.api.environment "production") (not $v.existingSecret) (not $v.api.apiKey) }}
{{- fail "api.apiKey (RUNTIME_API_KEY) is required when api.environment is production (or use existingSecret)" }}
{{- end }}
{{- if and $v.workers.enabled (ge (int $v.workers.shutdownGraceSecs) (int $v.workers.terminationGracePeriodSeconds)) }}
{{- fail (printf "workers.shutdownGraceSecs (%v) must be shorter than workers.terminationGracePeriodSeconds (%v)" $v.workers.shutdownGraceSecs $v.workers.terminationGracePeriodSeconds) }}
{{- end }}
{{- if and $v.workers.enabled (eq $v.workers.executor "command") (not (trim $v.workers.executorCommand)) }}
{{- fail "workers.executorCommand must not be empty when workers.executor is command" }}
{{- end }}
{{- if and $v.api.autoscaling.enabled (gt (int $v.api.autoscaling.minReplicas) (int $v.api.autoscaling.maxReplicas)) }}
{{- fail "api.autoscaling.minReplicas must not exceed api.autoscaling.maxReplicas" }}
{{- end }}
{{- if and $v.api.autoscaling.enabled (not $v.api.autoscaling.targetCPUUtilizationPercentage) (not $v.api.autoscaling.targetMemoryUtilizationPercentage) }}
{{- fail "api.autoscaling needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" }}
{{- end }}
{{- end }}

{{/*
Environment shared by api and reconciler: Postgres, NATS, membridge, S3, logging.
*/}}
{{- define "bloom.env.server" -}}
{{- $v := .Values -}}
{{- $secret := include "bloom.secretName" . -}}
{{ include "bloom.env.databaseUrl" (dict "ctx" . "secret" $secret) }}
- name: BLOOM_DB_MAX_CONNECTIONS
  value: {{ $v.database.maxConnections | int64 | quote }}
- name: BLOOM_DB_STATEMENT_TIMEOUT_MS
  value: {{ $v.database.statementTimeoutMs | int64 | quote }}
- name: BLOOM_IDEMPOTENCY_RETENTION_SECS
  value: {{ $v.database.idempotencyRetentionSecs | int64 | quote }}
{{ include "bloom.env.nats" . }}
{{- if $v.membridge.serverUrl }}
- name: MEMBRIDGE_SERVER_URL
  value: {{ $v.membridge.serverUrl | quote }}
{{- end }}
{{- if include "bloom.hasSecretKey" (dict "ctx" . "value" $v.membridge.adminKey) }}
{{ include "bloom.secretEnv" (dict "name" "MEMBRIDGE_ADMIN_KEY" "secret" $secret "optional" true) }}
{{- end }}
{{- if include "bloom.hasSecretKey" (dict "ctx" . "value" $v.membridge.agentKey) }}
{{ include "bloom.secretEnv" (dict "name" "MEMBRIDGE_AGENT_KEY" "secret" $secret "optional" true) }}
{{- end }}
- name: MEMBRIDGE_TIMEOUT_MS
  value: {{ $v.membridge.timeoutMs | int64 | quote }}
{{- if $v.s3.endpoint }}
- name: BLOOM_S3_ENDPOINT
  value: {{ $v.s3.endpoint | quote }}
{{- end }}
{{- if $v.s3.bucket }}
- name: BLOOM_S3_BUCKET
  value: {{ $v.s3.bucket | quote }}
{{- end }}
- name: BLOOM_S3_REGION
  value: {{ $v.s3.region | quote }}
- name: BLOOM_S3_PATH_STYLE
  value: {{ $v.s3.pathStyle | quote }}
- name: BLOOM_S3_TIMEOUT_MS
  value: {{ $v.s3.timeoutMs | int64 | quote }}
{{- if include "bloom.hasSecretKey" (dict "ctx" . "value" $v.s3.accessKeyId) }}
{{ include "bloom.secretEnv" (dict "name" "AWS_ACCESS_KEY_ID" "secret" $secret "optional" true) }}
{{- end }}
{{- if include "bloom.hasSecretKey" (dict "ctx" . "value" $v.s3.secretAccessKey) }}
{{ include "bloom.secretEnv" (dict "name" "AWS_SECRET_ACCESS_KEY" "secret" $secret "optional" true) }}
{{- end }}
{{- if $v.s3.minio.endpoint }}
- name: MINIO_ENDPOINT
  value: {{ $v.s3.minio.endpoint | quote }}
{{- end }}
- name: MINIO_PORT
  value: {{ $v.s3.minio.port | int64 | quote }}
- name: MINIO_USE_SSL
  value: {{ $v.s3.minio.useSsl | quote }}
- name: MINIO_ARTIFACT_BUCKET
  value: {{ $v.s3.minio.bucket | quote }}
{{- if include "bloom.hasSecretKey" (dict "ctx" . "value" $v.s3.minio.accessKey) }}
{{ include "bloom.secretEnv" (dict "name" "MINIO_ACCESS_KEY" "secret" $secret "optional" true) }}
{{- end }}
{{- if include "bloom.hasSecretKey" (dict "ctx" . "value" $v.s3.minio.secretKey) }}
{{ include "bloom.secretEnv" (dict "name" "MINIO_SECRET_KEY" "secret" $secret "optional" true) }}
{{- end }}
- name: BLOOM_LOG_FORMAT
  value: {{ $v.logFormat | quote }}
{{- end }}

{{/*
NATS environment (NATS_URL, BLOOM_NATS_NAMESPACE, BLOOM_LEASE_TTL_SECS, BLOOM_NATS_TIMEOUT_MS,
BLOOM_NATS_REPLICAS, BLOOM_NATS_TASK_MAX_AGE_SECS)
of the pods ("bloom.env.nats") and of the hook Jobs ("bloom.env.natsHook"), which read a
secret NATS_URL from the hook Secret. Call both with the root context.
*/}}
{{- define "bloom.env.nats" -}}
{{- include "bloom.env.natsWith" (dict "ctx" . "secret" (include "bloom.secretName" .)) }}
{{- end }}

{{- define "bloom.env.natsHook" -}}
{{- include "bloom.env.natsWith" (dict "ctx" . "secret" (include "bloom.hookSecretName" .)) }}
{{- end }}

{{- define "bloom.env.natsWith" -}}
{{- $v := .ctx.Values -}}
{{- if $v.nats.urlFromSecret -}}
{{ include "bloom.secretEnv" (dict "name" "NATS_URL" "secret" .secret) }}
{{- else -}}
- name: NATS_URL
  value: {{ $v.nats.url | quote }}
{{- end }}
- name: BLOOM_NATS_NAMESPACE
  value: {{ $v.nats.namespace | quote }}
- name: BLOOM_LEASE_TTL_SECS
  value: {{ $v.nats.leaseTtlSecs | int64 | quote }}
- name: BLOOM_NATS_TIMEOUT_MS
  value: {{ $v.nats.timeoutMs | int64 | quote }}
- name: BLOOM_NATS_REPLICAS
  value: {{ $v.nats.replicas | int64 | quote }}
- name: BLOOM_NATS_TASK_MAX_AGE_SECS
  value: {{ $v.nats.taskMaxAgeSecs | int64 | quote }}
{{- end }}

{{/*
Pod scheduling fields. Call with (dict "ctx" $ "c" <component values>).
*/}}
{{- define "bloom.scheduling" -}}
{{- $g := .ctx.Values }}
{{- with (default $g.nodeSelector .c.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $g.affinity .c.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $g.tolerations .c.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/*
Pod annotations: global merged with the component's, plus the checksum of the chart's
Secret when the pods read it (a changed secret value rolls them).
Call with (dict "ctx" $ "c" <component values> "usesSecret" bool).
*/}}
{{- define "bloom.podAnnotations" -}}
{{- $a := merge (dict) (.c.podAnnotations | default dict) (.ctx.Values.podAnnotations | default dict) }}
{{- if and .usesSecret (not .ctx.Values.existingSecret) }}
{{- $_ := set $a "checksum/secret" (include "bloom.secretData" .ctx | sha256sum) }}
{{- end }}
{{- toYaml $a }}
{{- end }}

{{/*
Pod labels: selector labels plus global and component podLabels.
*/}}
{{- define "bloom.podLabels" -}}
{{- $l := merge (dict) (.c.podLabels | default dict) (.ctx.Values.podLabels | default dict) }}
{{- $l = merge (include "bloom.labels" (dict "ctx" .ctx "component" .component) | fromYaml) $l }}
{{- toYaml $l }}
{{- end }}

{{/*
An HTTP probe. Call with (dict "p" <probe values> "path" "/healthz" "port" "http").
*/}}
{{- define "bloom.probe" -}}
httpGet:
  path: {{ .path }}
  port: {{ .port }}
{{- toYaml .p | nindent 0 }}
{{- end }}

{{/*
PodDisruptionBudget spec fields. Call with the component's pdb values.
*/}}
{{- define "bloom.pdbSpec" -}}
{{- if ne (toString .minAvailable) "" }}
minAvailable: {{ if kindIs "string" .minAvailable }}{{ .minAvailable | quote }}{{ else }}{{ .minAvailable | int64 }}{{ end }}
{{- else }}
maxUnavailable: {{ if kindIs "string" .maxUnavailable }}{{ .maxUnavailable | quote }}{{ else }}{{ .maxUnavailable | int64 }}{{ end }}
{{- end }}
{{- end }}
