{{- define "tokenslice.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tokenslice.labels" -}}
app.kubernetes.io/name: tokenslice
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "tokenslice.selector" -}}
app.kubernetes.io/name: tokenslice
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* image reference: (dict "image" .Values.images.x "root" .) */}}
{{- define "tokenslice.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{- define "tokenslice.webhookService" -}}
{{- printf "%s-webhook" (include "tokenslice.fullname" .) -}}
{{- end -}}
