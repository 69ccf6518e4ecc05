{{- define "modelplane.fullname" -}}
{{- if contains "modelplane" .Release.Name -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}{{- else -}}{{ printf "%s-modelplane" .Release.Name | trunc 40 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{/* Labels every object carries; `component` names the service. */}}
{{- define "modelplane.labels" -}}
app.kubernetes.io/name: modelplane
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: modelplane
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{- define "modelplane.selector" -}}
app.kubernetes.io/name: modelplane
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "modelplane.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* The address another service dials: the Service name, which the certificates name. */}}
{{- define "modelplane.address" -}}
{{ include "modelplane.fullname" .root }}-{{ .component }}:{{ .port }}
{{- end -}}

{{/* Environment every modelplane container gets. */}}
{{- define "modelplane.commonEnv" -}}
- name: MODELPLANE_LOG_LEVEL
  value: {{ .root.Values.logLevel | quote }}
- name: MODELPLANE_LOG_FORMAT
  value: json
# The root filesystem is read-only: state that is not on a volume goes to the pod's /tmp.
- name: HOME
  value: /tmp
- name: MODELPLANE_HOME
  value: /tmp/modelplane
{{- if .root.Values.tls.enabled }}
- name: MODELPLANE_TLS_CA_FILE
  value: /etc/modelplane/tls/ca.crt
- name: MODELPLANE_TLS_CERT_FILE
  value: /etc/modelplane/tls/tls.crt
- name: MODELPLANE_TLS_KEY_FILE
  value: /etc/modelplane/tls/tls.key
{{- end }}
{{- end -}}

{{- define "modelplane.tlsMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/modelplane/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "modelplane.tlsVolume" -}}
{{- if .root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .root.Values.tls.secretPrefix }}-{{ .component }}
    defaultMode: 0400
{{- end }}
{{- end -}}

{{/* Readiness and liveness on the gRPC health service, served in plaintext on its own port. */}}
{{- define "modelplane.grpcProbes" -}}
readinessProbe:
  grpc:
    port: {{ .Values.ports.health }}
  periodSeconds: 5
  failureThreshold: 3
livenessProbe:
  grpc:
    port: {{ .Values.ports.health }}
  initialDelaySeconds: 20
  periodSeconds: 10
  failureThreshold: 6
{{- end -}}

{{- define "modelplane.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "modelplane.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end -}}

{{- define "modelplane.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* NetworkPolicy peers: the pods of one component of this release, and Prometheus. */}}
{{- define "modelplane.peer" -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/instance: {{ .root.Release.Name }}
      app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- define "modelplane.prometheusPeer" -}}
- namespaceSelector: {{- toYaml .namespaceSelector | nindent 4 }}
{{- end }}

{{/* Non-empty when an autoscaler (KEDA or an HPA) drives the number of model-tier nodes. */}}
{{- define "modelplane.tritonAutoscaled" -}}
{{- if or .Values.triton.autoscaling.keda.enabled .Values.triton.autoscaling.hpa.enabled }}true{{ end -}}
{{- end -}}

{{/* The nodes' labels as MODELPLANE_NODE_LABELS reads them: k=v,k=v (sorted by key). */}}
{{- define "modelplane.nodeLabels" -}}
{{- $pairs := list }}
{{- range $key, $value := .Values.triton.labels }}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) }}
{{- end }}
{{- join "," $pairs }}
{{- end -}}

{{/* Values of the model tier that render valid objects but would not work: refused with what to do. */}}
{{- define "modelplane.checkModelTier" -}}
{{- $triton := .Values.triton }}
{{- $scaling := $triton.autoscaling }}
{{- if and $scaling.keda.enabled $scaling.hpa.enabled }}
{{- fail "triton.autoscaling: enable either keda or hpa, not both: two autoscalers would fight over the StatefulSet's replicas." }}
{{- end }}
{{- if and (not (include "modelplane.tritonAutoscaled" .)) (lt (int $triton.replicas) 1) }}
{{- fail (printf "triton.replicas is %v: with no node nothing can hold a model. Set it to 1 or more, or enable triton.autoscaling.keda or .hpa." $triton.replicas) }}
{{- end }}
{{- if gt (int $scaling.minReplicas) (int $scaling.maxReplicas) }}
{{- fail (printf "triton.autoscaling.minReplicas (%v) is above maxReplicas (%v): raise maxReplicas or lower minReplicas." $scaling.minReplicas $scaling.maxReplicas) }}
{{- end }}
{{- if and $scaling.keda.enabled (not $scaling.keda.serverAddress) }}
{{- fail "triton.autoscaling.keda.serverAddress is empty: KEDA needs the URL of the Prometheus that scrapes the registry (http://prometheus.monitoring.svc:9090)." }}
{{- end }}
{{- if and $triton.drain.enabled (lt (int $triton.terminationGracePeriodSeconds) (add (int $triton.drain.timeoutSeconds) 30)) }}
{{- fail (printf "triton.terminationGracePeriodSeconds (%v) must be at least triton.drain.timeoutSeconds (%v) + 30: Kubernetes kills the pod when the grace period ends, in the middle of the drain. Raise it, or lower the drain's timeout." $triton.terminationGracePeriodSeconds $triton.drain.timeoutSeconds) }}
{{- end }}
{{- end -}}
