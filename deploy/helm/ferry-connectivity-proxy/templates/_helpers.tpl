{{/* Helpers of this chart. Named with the chart's prefix so an umbrella chart can hold several. */}}

{{- define "connectivity-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "connectivity-proxy.fullname" -}}
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

{{- define "connectivity-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "connectivity-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "connectivity-proxy.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "connectivity-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ferry
{{- end -}}

{{- define "connectivity-proxy.image" -}}
{{- $i := .Values.deployment.image -}}
{{- $tag := default .Chart.AppVersion $i.tag -}}
{{- if $i.registry -}}
{{- printf "%s/%s:%s" $i.registry $i.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" $i.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* SAP's levels (trace ... fatal) as a FERRY_LOG filter; tracing has no "fatal". */}}
{{- define "connectivity-proxy.logFilter" -}}
{{- $l := .Values.config.logging.level | lower -}}
{{- if not (has $l (list "trace" "debug" "info" "warn" "error" "fatal")) -}}
{{- fail (printf "config.logging.level must be one of trace, debug, info, warn, error, fatal (got %q)" $l) -}}
{{- end -}}
{{- printf "warn,ferry=%s,ferry::audit=info" (ternary "error" $l (eq $l "fatal")) -}}
{{- end -}}

{{- define "connectivity-proxy.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.deployment.securityContext.runAsUser }}
runAsGroup: {{ .Values.deployment.securityContext.runAsUser }}
fsGroup: {{ .Values.deployment.securityContext.runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "connectivity-proxy.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "connectivity-proxy.imagePullSecrets" -}}
{{- with .Values.deployment.image.pullSecret }}
imagePullSecrets:
  - name: {{ . }}
{{- end }}
{{- end -}}
