{{/*
A hook Job running bloomctl. Call with (dict "ctx" $ "name" "migrate" "weight" "-5" "args" (list ...) "env" <env yaml>).
*/}}
{{- define "bloom.hookJob" -}}
{{- $ctx := .ctx }}
{{- $v := $ctx.Values }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "bloom.fullname" $ctx }}-{{ .name }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "bloom.labels" (dict "ctx" $ctx "component" .name) | nindent 4 }}
  annotations:
    helm.sh/hook: pre-install,pre-upgrade
    helm.sh/hook-weight: {{ .weight | quote }}
    helm.sh/hook-delete-policy: {{ $v.hooks.deletePolicy }}
spec:
  backoffLimit: {{ $v.hooks.backoffLimit | int64 }}
  activeDeadlineSeconds: {{ $v.hooks.activeDeadlineSeconds | int64 }}
  template:
    metadata:
      labels:
        {{- include "bloom.labels" (dict "ctx" $ctx "component" .name) | nindent 8 }}
      {{- with $v.hooks.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "bloom.hookServiceAccountName" $ctx }}
      # Kubernetes' service-link variables (`<SERVICE>_PORT=tcp://...`) would collide with
      # settings such as MINIO_PORT when a Service of that name shares the namespace.
      enableServiceLinks: false
      automountServiceAccountToken: false
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .name }}
          image: {{ include "bloom.image" (dict "ctx" $ctx) }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          command: ["/usr/local/bin/bloomctl"]
          args:
            {{- toYaml .args | nindent 12 }}
          env:
            {{- .env | nindent 12 }}
          resources:
            {{- toYaml $v.hooks.resources | nindent 12 }}
          securityContext:
            {{- toYaml $v.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
{{- end }}
