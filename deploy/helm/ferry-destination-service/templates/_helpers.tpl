{{/* Helpers of this chart. Named with the chart's prefix so an umbrella chart can hold several. */}}

{{- define "destination-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "destination-service.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "destination-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "destination-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "destination-service.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "destination-service.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ferry
{{- end -}}

{{- define "destination-service.image" -}}
{{- $i := .Values.deployment.image -}}
{{- $tag := default .Chart.AppVersion $i.tag -}}
{{- if $i.registry -}}
{{- printf "%s/%s:%s" $i.registry $i.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" $i.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* SAP's levels (trace ... fatal) as a FERRY_LOG filter; tracing has no "fatal". */}}
{{- define "destination-service.logFilter" -}}
{{- $l := .Values.config.logging.level | lower -}}
{{- if not (has $l (list "trace" "debug" "info" "warn" "error" "fatal")) -}}
{{- fail (printf "config.logging.level must be one of trace, debug, info, warn, error, fatal (got %q)" $l) -}}
{{- end -}}
{{- printf "warn,ferry=%s,ferry::audit=info" (ternary "error" $l (eq $l "fatal")) -}}
{{- end -}}

{{- define "destination-service.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.deployment.securityContext.runAsUser }}
runAsGroup: {{ .Values.deployment.securityContext.runAsUser }}
fsGroup: {{ .Values.deployment.securityContext.runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "destination-service.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "destination-service.imagePullSecrets" -}}
{{- with .Values.deployment.image.pullSecret }}
imagePullSecrets:
  - name: {{ . }}
{{- end }}
{{- end -}}
