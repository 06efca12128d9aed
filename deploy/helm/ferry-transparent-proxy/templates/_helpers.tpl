{{/* Helpers of this chart. Named with the chart's prefix so an umbrella chart can hold several. */}}

{{- define "transparent-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "transparent-proxy.fullname" -}}
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

{{- define "transparent-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "transparent-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "transparent-proxy.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "transparent-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ferry
{{- end -}}

{{- define "transparent-proxy.image" -}}
{{- $i := .Values.deployment.image -}}
{{- $tag := default .Chart.AppVersion $i.tag -}}
{{- if $i.registry -}}
{{- printf "%s/%s:%s" $i.registry $i.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" $i.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* SAP's levels (trace ... fatal) as a FERRY_LOG filter; tracing has no "fatal". */}}
{{- define "transparent-proxy.logFilter" -}}
{{- $l := .Values.config.logging.level | lower -}}
{{- if not (has $l (list "trace" "debug" "info" "warn" "error" "fatal")) -}}
{{- fail (printf "config.logging.level must be one of trace, debug, info, warn, error, fatal (got %q)" $l) -}}
{{- end -}}
{{- printf "warn,ferry=%s,ferry::audit=info" (ternary "error" $l (eq $l "fatal")) -}}
{{- end -}}

{{- define "transparent-proxy.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.deployment.securityContext.runAsUser }}
runAsGroup: {{ .Values.deployment.securityContext.runAsUser }}
fsGroup: {{ .Values.deployment.securityContext.runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "transparent-proxy.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "transparent-proxy.imagePullSecrets" -}}
{{- with .Values.deployment.image.pullSecret }}
imagePullSecrets:
  - name: {{ . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one kind of pod: (list $ "http"|"tcp"|"controller"). */}}
{{- define "transparent-proxy.componentLabels" -}}
{{ include "transparent-proxy.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}
