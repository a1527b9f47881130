{{/* Names: the release's full name, trimmed to the 63 characters of a DNS label. */}}
{{- define "kiln.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kiln.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "router"). */}}
{{- define "kiln.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference: (dict "root" $ "image" .Values.images.router). */}}
{{- define "kiln.image" -}}
{{- $repo := .image.repository -}}
{{- with .root.Values.imageRegistry }}{{ $repo = printf "%s/%s" (trimSuffix "/" .) $repo }}{{ end -}}
{{- printf "%s:%s" $repo (.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{/* etcd client URLs, comma-separated: the bundled members' Service, or the external ones. */}}
{{- define "kiln.etcdEndpoints" -}}
{{- if .Values.etcd.bundled -}}
http://{{ include "kiln.fullname" . }}-etcd:2379
{{- else -}}
{{- if not .Values.etcd.external.endpoints -}}
{{- fail "etcd.bundled is false: give etcd.external.endpoints (client URLs such as http://etcd.infra:2379)" -}}
{{- end -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by routers and workers: log filter and OpenTelemetry export. */}}
{{- define "kiln.commonEnv" -}}
RUST_LOG: {{ .Values.logLevel | quote }}
{{- with .Values.otel.endpoint }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ . | quote }}
OTEL_EXPORTER_OTLP_PROTOCOL: {{ $.Values.otel.protocol | quote }}
{{- end }}
{{- range $k, $v := .Values.otel.extraEnv }}
{{ $k }}: {{ $v | toString | quote }}
{{- end }}
{{- end -}}

{{- define "kiln.apiKeySecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-api-key" (include "kiln.fullname" .)) -}}
{{- end -}}
